"""The engine's host side without a model or a device: the scheduler (queue, admission, rows,
chunked prefill, stop conditions, cancellation, events, counters) driven by hand, and the
prefix and verdict caches."""

import itertools

import numpy as np
import pytest

from safevlm_jax.inference.caches import LRU, PrefixCache
from safevlm_jax.inference.requests import (DoneEvent, EngineClosed, EngineRequest, FinishReason, QueueFull,
                                            TextEvent, VerdictEvent)
from safevlm_jax.inference.scheduler import Scheduler, Seq, Status
from safevlm_jax.safety.gate import Refusal
from safevlm_jax.safety.verdict import Verdict

EOS, IMAGE = 2, 99
BLOCK = Verdict(3, 1, (0, 0, 0, 1.0), (0,) * 7, None, "block")
HINT = Verdict(2, 1, (0, 0, 1.0, 0), (0,) * 7, "careful", "may_refuse")


class FakeGate:
    """Prompt: BOS, 4 image positions (if any), one id per character of the question, 3 more
    per hint; a `block` verdict refuses; a question "raise" fails."""

    def admit(self, verdict, conversation, prompt_format, *, safety, image):
        question = conversation.turns[-1].value
        if question == "raise":
            raise ValueError("cannot tokenize")
        if verdict is not None and verdict.action == "block":
            return Refusal("No.")
        hint = [7, 7, 7] if verdict is not None and verdict.hint else []
        return [1] + [IMAGE] * 4 * image + [10 + ord(c) % 50 for c in question] + hint


class FakeDetok:
    def push(self, token):
        return f"<{token}>"

    def flush(self):
        return ""


def scheduler(rows=4, max_queue=8, chunk=4, corners=True):
    return Scheduler(rows=rows, max_length=64, max_queue=max_queue, gate=FakeGate(), eos_id=EOS,
                     detokenizer=FakeDetok, row_buckets=(1, 2, 4)[:rows.bit_length()], length_buckets=(16, 32, 64),
                     prefill_chunk=chunk, whole_chunk=64, corners=corners)


_ids = itertools.count()


def add(s, question="Hi", image=True, max_tokens=5):
    seq = Seq(next(_ids), EngineRequest(np.zeros(1) if image else None, question, max_tokens=max_tokens),
              "img" if image else None, FakeDetok(), 0.0)
    s.add(seq)
    return seq


def turn(s, verdicts=None, tokens=None, done=None):
    """One engine turn with the device faked: verdicts given (default None each), a prefill
    chunk that samples token 5, a decode step giving `tokens` / `done` per row."""
    plan, out = s.schedule()
    if plan.verdict:
        out += s.verdicts_done(plan.verdict, verdicts or [None] * len(plan.verdict), [None] * len(plan.verdict))
    for seq in plan.begin:
        seq.computed = 0
    if plan.prefill is not None:
        seq = plan.prefill
        end = seq.computed + s.chunk(seq, plan.budget)
        out += s.prefilled(seq, end, 5 if end == len(seq.prompt_ids) else None)
    if plan.decode is not None:
        rows = plan.decode[0]
        out += s.stepped(np.full(rows, 6) if tokens is None else tokens[:rows],
                         np.zeros(rows, bool) if done is None else done[:rows])
    return plan, out


def kinds(out, seq):
    return [type(e).__name__ for q, e in out if q is seq]


def test_requests_take_the_lowest_free_rows_in_order_and_verdicts_batch_up_to_the_free_rows():
    s = scheduler(rows=2)
    a, b, c = add(s), add(s), add(s)
    plan, _ = turn(s)
    assert plan.verdict == [a, b] and plan.begin == [] and plan.decode is None  # 2 free rows
    plan, _ = turn(s)
    assert plan.begin == [a, b] and (a.row, b.row) == (0, 1) and plan.verdict == []  # c waits: no free row
    assert a.status is Status.DECODE and b.status is Status.PREFILL  # one prefill chunk per turn
    plan, _ = turn(s, done=np.array([True, False]))  # a: done on the device (max tokens)
    assert plan.prefill is b and plan.decode == (1, 16) and a.status is Status.DONE
    plan, _ = turn(s)  # b's last chunk (whole: no row decodes) and c's verdict
    assert plan.verdict == [c] and plan.prefill is b and plan.decode is None and b.status is Status.DECODE
    plan, _ = turn(s)
    assert plan.begin == [c] and c.row == 0 and plan.decode == (2, 16)  # the lowest free row


def test_events_are_verdict_texts_then_exactly_one_done_and_the_device_decides_stop_or_length():
    s = scheduler()
    a, b = add(s), add(s)
    outs = []
    for step in range(8):
        tokens = np.array([6, EOS, 6, 6]) if step == 4 else np.array([6, 6, 6, 6])
        outs += turn(s, tokens=tokens, done=np.array([step == 5, step == 4, False, False]))[1]
    for seq in (a, b):
        assert kinds(outs, seq)[0] == "VerdictEvent" and kinds(outs, seq)[-1] == "DoneEvent"
        assert kinds(outs, seq).count("DoneEvent") == 1 and set(kinds(outs, seq)[1:-1]) == {"TextEvent"}
    done = {q: e for q, e in outs if isinstance(e, DoneEvent)}
    assert done[b].finish_reason is FinishReason.STOP and b.generated[-1] == EOS
    assert done[a].finish_reason is FinishReason.LENGTH and done[a].completion_tokens == len(a.generated)
    ids = [i for q, e in outs if q is a and not isinstance(e, VerdictEvent) for i in e.token_ids]
    assert ids == a.generated and "".join(e.text for q, e in outs if q is a and isinstance(e, TextEvent)) == \
        "".join(f"<{t}>" for t in a.generated)
    assert s.counters.accepted == 2 and sum(s.counters.finished.values()) == 2 and not s.in_flight()


def test_a_blocked_request_gets_its_verdict_the_refusal_and_done_without_a_row():
    s = scheduler()
    blocked, hinted = add(s), add(s)
    plan, out = turn(s, verdicts=[BLOCK, HINT])
    assert kinds(out, blocked) == ["VerdictEvent", "TextEvent", "DoneEvent"]
    assert [e.text for q, e in out if q is blocked and isinstance(e, TextEvent)] == ["No."]
    [done] = [e for q, e in out if q is blocked and isinstance(e, DoneEvent)]
    assert done.finish_reason is FinishReason.BLOCKED and blocked.row is None
    assert hinted.prompt_ids[-3:] == [7, 7, 7] and [e.prompt_ids for q, e in out if q is hinted][0] == \
        tuple(hinted.prompt_ids)
    assert s.counters.by_level == {3: 1, 2: 1}


def test_cancel_while_waiting_prefilling_or_decoding_ends_it_once_and_releases_its_row():
    s = scheduler(chunk=4)
    waiting, decoding = add(s), add(s, "Hi")
    turn(s)  # verdicts
    turn(s)  # waiting -> row 0 and prefilled whole; decoding -> row 1, waits for its chunk
    prefilling = add(s, "a longer question")
    turn(s)
    turn(s)
    turn(s)  # prefilling: row 2, first chunk of 4 (rows decode)
    assert prefilling.status is Status.PREFILL and 0 < prefilling.computed < len(prefilling.prompt_ids)
    queued = add(s)
    for seq in (waiting, decoding, prefilling, queued):
        seq.cancelled = True
    plan, out = s.schedule()
    for seq in (waiting, decoding, prefilling, queued):
        assert kinds(out, seq)[-1] == "DoneEvent" and kinds(out, seq).count("DoneEvent") == 1
    assert kinds(out, queued) == ["VerdictEvent", "DoneEvent"]  # never got its verdict
    assert sorted(plan.release) == [0, 1, 2] and plan.decode is None and not s.busy
    assert s.counters.finished["cancelled"] == 4 and s.schedule()[0].release == []


def test_prompts_prefill_in_chunks_while_rows_decode_and_whole_when_none_do():
    s = scheduler(chunk=4)
    first = add(s, "q")  # prompt of 6
    turn(s)
    plan, _ = turn(s)
    assert plan.budget == 64 and first.status is Status.DECODE  # alone: the whole prompt at once
    second = add(s, "a question of twenty")  # prompt of 25
    turn(s)
    chunks = []
    while second.status is Status.PREFILL or not chunks:
        plan, _ = turn(s)
        if plan.prefill is second:
            chunks.append((plan.budget, second.computed))
    assert all(budget == 4 for budget, _ in chunks) and [c for _, c in chunks] == [4, 8, 12, 16, 20, 24, 25]
    assert plan.decode is not None  # the first row decoded at every turn meanwhile


def test_a_chunk_mostly_padding_gives_way_to_the_largest_bucket_below_its_tokens():
    s = Scheduler(rows=2, max_length=2048, max_queue=4, gate=FakeGate(), eos_id=EOS, detokenizer=FakeDetok,
                  row_buckets=(1, 2), length_buckets=(128, 256, 512, 1024, 2048), prefill_chunk=64,
                  whole_chunk=2048, chunk_buckets=(16, 64, 256, 1024, 4096))
    seq = add(s, "x" * 995)  # 1000 prompt tokens: a prefix of 1024 slots
    turn(s)
    plan, _ = s.schedule()
    assert plan.prefill is seq and s.chunk(seq, plan.budget) == 1000  # they fill a 1024-wide chunk
    seq.computed = 700  # a reused prefix; the 300 tokens left would pad a 1024-wide chunk
    plan, _ = s.schedule()
    assert plan.prefill is seq and s.chunk(seq, plan.budget) == 256
    s.prefilled(seq, 980, None)
    plan, _ = s.schedule()  # 20 left pad a 64-wide chunk, but narrower chunks are not worth a call
    assert plan.prefill is seq and s.chunk(seq, plan.budget) == 20
    s.split_from = 16  # where they are (CPU): 16 now, the 4 left in a 16-wide chunk next
    assert s.chunk(seq, plan.budget) == 16
    s.prefilled(seq, 1000, 5)
    s.stepped(np.full(1, 6), np.array([True]))
    assert seq.status is Status.DONE
    other = add(s, "y" * 295)  # 300 tokens: a prefix of 512 slots, a chunk they fill more than half
    turn(s)
    plan, _ = s.schedule()
    assert plan.prefill is other and s.chunk(other, plan.budget) == 300


def test_decode_shape_holds_every_busy_row_and_its_next_slot():
    s = scheduler(rows=4)
    a = add(s, "x" * 5)  # 10 tokens
    for _ in range(3):
        plan, _ = turn(s)
    assert plan.decode == (1, 16) and a.cached == 11  # 10 prompt tokens, the first generated one
    for _ in range(6):
        plan, _ = turn(s)  # a.cached grows to 16 when planned: slot 16 is next
    assert plan.decode == (1, 32)
    assert s.step_shapes() == [(1, 16), (1, 32), (1, 64), (2, 16), (2, 32), (2, 64), (4, 16), (4, 64)]


def test_a_full_queue_and_a_closed_scheduler_refuse_and_the_counters_stay_exact():
    s = scheduler(max_queue=2)
    add(s), add(s)
    with pytest.raises(QueueFull, match="2 requests"):
        add(s)
    s.accepting = False
    with pytest.raises(EngineClosed):
        add(s)
    assert s.counters.accepted == 2


def test_an_admission_that_raises_fails_that_request_only():
    s = scheduler()
    bad, good = add(s, "raise"), add(s)
    _, out = turn(s)
    assert kinds(out, bad) == ["VerdictEvent", "DoneEvent"] and out[1][1].error == "ValueError: cannot tokenize"
    assert good.status is Status.READY


def test_rows_that_finish_normally_are_saved_as_prefixes_with_the_ids_they_hold():
    s = scheduler()
    a = add(s, "q", max_tokens=3)
    turn(s)
    turn(s)  # prefill: first token 5
    turn(s)  # 6
    plan, _ = turn(s, done=np.array([True, False, False, False]))  # 6, done
    plan, _ = s.schedule()
    assert plan.save == [(0, a.prompt_ids + [5, 6], a)] and a.generated == [5, 6, 6]


def test_prefix_cache_gives_the_longest_usable_prefix_within_the_image_rule_and_memory_bound():
    cache = PrefixCache(max_bytes=100, image_token_id=IMAGE)
    cache.add([1, 2, 3, IMAGE, IMAGE, 4, 5], "img-a", "A", 40)
    cache.add([1, 2, 3, IMAGE, IMAGE, 4, 6, 7], "img-a", "B", 40)
    hit = cache.lookup([1, 2, 3, IMAGE, IMAGE, 4, 6, 7, 8], "img-a")
    assert (hit.value, hit.length) == ("B", 8)
    assert cache.lookup([1, 2, 3, IMAGE, IMAGE, 4, 6, 7], "img-a").length == 7  # one token left to prefill
    hit = cache.lookup([1, 2, 3, IMAGE, IMAGE, 4, 6], "img-b")  # another image: up to its first position
    assert hit.length == 3
    assert cache.lookup([9, 1], None) is None
    cache.add([5, 5, 5], None, "C", 40)  # over 100 bytes: the least recently used (A) goes
    assert len(cache) == 2 and cache.nbytes == 80
    assert cache.lookup([1, 2, 3, IMAGE, IMAGE, 4, 5, 9], "img-a").value == "B"
    lru = LRU(max_bytes=10)
    lru.put("big", 1, 11)
    assert lru.get("big") is None and lru.nbytes == 0


def test_without_corners_every_step_runs_over_the_whole_state():
    s = scheduler(rows=4, corners=False)
    add(s, "x" * 5)
    for _ in range(3):
        plan, _ = turn(s)
    assert plan.decode == (4, 64) and s.step_shapes() == [(4, 64)]
