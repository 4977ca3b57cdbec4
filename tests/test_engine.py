"""The serving engine on the shipped demo checkpoint: a request's greedy tokens are the same
alone, among 7 others and from `SafeVLMInference.answer`; freed rows refill while others
decode; long prompts go in chunks between decode steps; a chat's second turn reuses the first
turn's prefix and verdict; nothing recompiles after warm-up; per-row sampling; EOS and
max_tokens; the policy's block; cancel; shutdown; errors of one request fail that request only."""

import os
import threading

import jax
import numpy as np
import pytest

from safevlm_jax.checkpoint.demo import DEMO_DIR
from safevlm_jax.data.records import GPT, HUMAN, Turn
from safevlm_jax.inference import detokenize
from safevlm_jax.inference.engine import Engine, EngineClosed, EngineRequest, QueueFull
from safevlm_jax.inference.errors import BadRequest
from safevlm_jax.inference.pipeline import Request, SafeVLMInference, load_image
from safevlm_jax.inference.runner import Runner
from safevlm_jax.safety.policy import parse_policy
from safevlm_jax.safety.prompt import Conversation
from tests.serve_helpers import DEMO_ENGINE

_COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: _COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
EXAMPLES = ("clean", "low_risk", "medium_risk", "risky")
QUESTIONS = ("What is shown in this image?", "Describe the picture.")


@pytest.fixture(scope="module")
def vlm(demo_vlm):
    return demo_vlm


@pytest.fixture(scope="module")
def pixels(vlm):
    return {name: load_image(os.path.join(DEMO_DIR, "examples", f"{name}.png"), vlm.images) for name in EXAMPLES}


@pytest.fixture(scope="module")
def engine(demo_engine):
    """The suite's shared engine (8 slots): tests that leave it as they found it."""
    return demo_engine


def own_engine(inference, **kw) -> Engine:
    """A started engine of the shared engine's shape (its compiled programs), for a test that
    changes settings, shuts it down or breaks it."""
    return Engine.from_inference(inference, **{**DEMO_ENGINE, **kw}).start()


class Log:
    """Every event of every request, in the order the engine sent them."""

    def __init__(self):
        self.events, self.lock = [], threading.Lock()

    def __call__(self, tag):
        def on_event(event):
            with self.lock:
                self.events.append((tag, event))
        return on_event

    def of(self, tag):
        return [e for t, e in self.events if t == tag]


def run(engine, requests, log=None):
    """Submits all, waits for all; checks each got verdict, text..., done in that order."""
    log = log or Log()
    handles = [engine.submit(r, log(i)) for i, r in enumerate(requests)]
    assert all(h.wait(120) for h in handles)
    for i, h in enumerate(handles):
        kinds = [e.kind for e in log.of(i)]
        assert kinds[0] == "verdict" and kinds[-1] == "done" and set(kinds[1:-1]) <= {"text"}, kinds
        assert "".join(e.text for e in log.of(i) if e.kind == "text") == h.text
    return handles


def assert_same_verdicts(got, want):
    """Equal decisions; probabilities equal up to float rounding (batches of other sizes)."""
    strip = lambda v: (v.risk_level, v.risk_type, v.action, v.hint, v.fail_closed)
    assert [strip(v) for v in got] == [strip(v) for v in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.risk_level_probs + g.risk_type_probs,
                                   w.risk_level_probs + w.risk_type_probs, rtol=1e-4, atol=1e-7)


def request(pixels, name, question=QUESTIONS[0], **kw):
    return EngineRequest(pixel_values=pixels[name], prompt=question, **kw)


@pytest.fixture(scope="module")
def eight(pixels):
    return [request(pixels, n, q, max_tokens=24) for q in QUESTIONS for n in EXAMPLES]


@pytest.fixture(scope="module")
def together(engine, eight):
    return run(engine, eight)


def test_greedy_tokens_among_seven_others_equal_alone_and_the_batch_answer(vlm, engine, eight, together):
    alone = [run(engine, [r])[0] for r in eight]
    assert [h.token_ids for h in together] == [h.token_ids for h in alone]
    assert [h.text for h in together] == [h.text for h in alone]
    paths = [os.path.join(DEMO_DIR, "examples", f"{n}.png") for n in EXAMPLES]
    want = vlm.answer([Request(p, q) for q in QUESTIONS for p in paths], max_new_tokens=24)
    assert [h.token_ids for h in together] == [r.token_ids for r in want]
    assert [h.text for h in together] == [r.answer for r in want]
    assert [h.prompt_ids for h in together] == [r.prompt_token_ids for r in want]
    assert_same_verdicts([h.verdict for h in together], [r.verdict for r in want])
    assert {h.finish_reason for h in together} <= {"stop", "length"}


def test_safety_off_is_plain_llava_equal_to_the_batch_answer(vlm, engine, pixels):
    [off] = run(engine, [request(pixels, "risky", max_tokens=8, safety=False)])
    [want] = vlm.answer([Request(os.path.join(DEMO_DIR, "examples", "risky.png"), QUESTIONS[0])],
                        max_new_tokens=8, safety=False)
    assert off.verdict is None and off.action is None
    assert off.token_ids == want.token_ids and off.text == want.answer
    assert len(off.prompt_ids) == len(vlm.gate.builders[(False, "llava")].build(QUESTIONS[0]))  # no safety tokens


def test_a_freed_row_is_refilled_while_the_others_keep_decoding(engine, pixels, eight, together):
    log = Log()
    short = request(pixels, "clean", max_tokens=2)
    late = request(pixels, "risky", QUESTIONS[1], max_tokens=24)  # the 9th: waits for a row
    handles = run(engine, [short] + eight[1:] + [late], log)
    order = [(tag, e.kind) for tag, e in log.events]
    refilled = order.index((8, "verdict"))
    assert order.index((0, "done")) < refilled
    long_done = [order.index((i, "done")) for i in range(1, 8) if len(together[i].token_ids) > 6]
    assert long_done and refilled < min(long_done)  # the others were still decoding
    assert handles[0].token_ids == together[0].token_ids[:2] and handles[0].finish_reason == "length"
    assert [h.token_ids for h in handles[1:8]] == [h.token_ids for h in together[1:8]]
    assert handles[8].token_ids == together[7].token_ids  # same request as the 8th, other row


def test_a_long_prompt_goes_in_chunks_between_the_decode_steps_of_the_others(vlm, pixels, together):
    """With 16-token chunks, a request arriving while another decodes is prefilled over several
    turns, each followed by a decode step of the first (its text keeps coming); both get the
    tokens they get alone."""
    e = own_engine(vlm, prefill_chunk=16, prefix_cache_bytes=0)
    log = Log()
    first = e.submit(request(pixels, "clean", max_tokens=24), log(0))
    while not log.of(0) or log.of(0)[-1].kind != "text":
        threading.Event().wait(0.01)
    second = e.submit(request(pixels, "risky", QUESTIONS[1], max_tokens=24), log(1))
    assert first.wait(120) and second.wait(120)
    e.shutdown()
    order = [(tag, e.kind) for tag, e in log.events]
    admitted, answered = order.index((1, "verdict")), next(i for i, x in enumerate(order) if x == (1, "text"))
    assert sum(x == (0, "text") for x in order[admitted:answered]) >= 5  # ~120 prompt tokens: 8 chunks
    assert first.token_ids == together[0].token_ids and second.token_ids == together[7].token_ids
    assert e.stats().prefill_chunks >= 9


def test_a_second_turn_reuses_the_first_turns_prefix_and_verdict(vlm, pixels):
    """Turn 2 of a conversation about the same image (a policy that adds no hint, so the first
    turn's prompt and answer are a prefix of the second's) prefills only its new tokens, reads
    the verdict of its image from the cache, and answers as without any cache."""
    quiet = SafeVLMInference(vlm.model, vlm.tokenizer, vlm.images, policy=parse_policy(
        {"rules": {t: {} for t in range(6)}}))

    def chat(engine):
        [one] = run(engine, [request(pixels, "medium_risk", max_tokens=12)])
        turns = (Turn(HUMAN, QUESTIONS[0]), Turn(GPT, one.text.strip()), Turn(HUMAN, QUESTIONS[1]))
        [two] = run(engine, [request(pixels, "medium_risk", Conversation(turns), max_tokens=12)])
        return one, two

    e = own_engine(quiet)
    one, two = chat(e)
    stats = e.stats()
    e.shutdown()
    assert one.verdict.risk_level == 2 and one.verdict.hint is None  # the verdict, no hint
    assert two.prompt_ids[:len(one.prompt_ids)] == one.prompt_ids
    assert stats.prefix_hits == 1 and stats.reused_tokens >= len(one.prompt_ids)
    assert stats.prefill_tokens == len(one.prompt_ids) + len(two.prompt_ids) - stats.reused_tokens
    assert stats.verdict_cache_hits == 1 and stats.verdict_batches == 1
    cold = own_engine(quiet, prefix_cache_bytes=0)
    want = chat(cold)
    cold.shutdown()
    assert [h.token_ids for h in want] == [one.token_ids, two.token_ids]


def test_a_prompt_cached_but_its_last_token_goes_into_its_row_without_a_prefill(engine, pixels):
    """The same request again: the cached prefix of its first run holds all of its prompt but
    the last token, so it is inserted from the cache as it is (no prefill, no copy into a new
    prefix) and the first decode step reads that token; the answer is the same."""
    ask = lambda: run(engine, [request(pixels, "low_risk", "Which letter is on the shape, exactly?", max_tokens=8)])[0]
    first = ask()
    before = engine.stats()
    again = ask()
    after = engine.stats()
    assert after.prefill_chunks == before.prefill_chunks and after.prefill_tokens == before.prefill_tokens
    assert after.prefix_hits == before.prefix_hits + 1
    assert after.reused_tokens - before.reused_tokens == len(first.prompt_ids) - 1
    assert again.token_ids == first.token_ids and again.prompt_ids == first.prompt_ids


def test_nothing_recompiles_after_warm_up(engine, pixels, together):
    engine.warm_up(timeout=900)  # every program the loop can run
    for n in (1, 2, 4, 8):  # moderation runs the verdict program at each batch bucket
        engine.moderate(np.stack([pixels["clean"]] * n))
    before = len(_COMPILES)
    questions = ["Hi?", "What colour is the shape, and which letter is written on it?", "Shape?"]
    mixed = [request(pixels, name, q, max_tokens=m, temperature=t, top_p=p, top_k=k, seed=s)
             for name, q, m, t, p, k, s in zip(EXAMPLES * 2, questions * 3, (3, 9, 17, 5, 30, 1, 12),
                                               (0, 0.8, 1.3, 0, 0.5, 2.0, 0.9), (1, 0.9, 1, 1, 0.5, 1, 0.95),
                                               (0, 0, 5, 0, 3, 1, 0), range(7))]
    run(engine, mixed + [EngineRequest(None, "Say hello.", max_tokens=3)])
    run(engine, mixed[:3])
    # stop strings, penalties, logprobs (a first token from the step), a grammar's masked step, n choices
    extras = [request(pixels, "clean", max_tokens=6, stop=("e",), presence_penalty=0.5, frequency_penalty=1.0),
              request(pixels, "low_risk", max_tokens=6, logprobs=True, temperature=0.7, seed=3),
              request(pixels, "clean", max_tokens=6, json_schema={"type": "object"})]
    run(engine, extras + mixed[3:5])
    assert all(h.wait(120) for h in engine.submit_choices(request(pixels, "risky", max_tokens=4, temperature=1.0), 3))
    assert len(_COMPILES) == before, _COMPILES[before:]


def test_each_row_keeps_its_own_sampling_settings_among_others(engine, pixels, together):
    sampled = request(pixels, "low_risk", max_tokens=24, temperature=1.5, seed=11)
    both = request(pixels, "risky", max_tokens=24, temperature=1.0, top_k=20, top_p=0.8, seed=3)
    top1 = request(pixels, "clean", max_tokens=24, temperature=1.0, top_k=1, seed=5)
    handles = run(engine, [sampled, both, top1] + [request(pixels, "medium_risk", temperature=1.5, seed=s)
                                                   for s in range(5)])
    assert handles[0].token_ids == run(engine, [sampled])[0].token_ids
    assert handles[1].token_ids == run(engine, [both])[0].token_ids
    assert handles[2].token_ids == together[0].token_ids  # top-k 1 is greedy
    assert len({tuple(h.token_ids) for h in handles[3:]}) > 1  # seeds differ, draws differ


def test_stops_at_eos_or_max_tokens(vlm, engine, pixels, together):
    eos = vlm.tokenizer.eos_token_id
    [done] = [h for h in together if h.finish_reason == "stop"][:1]
    assert done.token_ids[-1] == eos and eos not in done.token_ids[:-1]
    assert done.done_event.completion_tokens == len(done.token_ids)
    assert done.text == detokenize.decode(vlm.tokenizer, done.token_ids[:-1])  # the answer's text, no leading space
    [cut] = run(engine, [request(pixels, "clean", max_tokens=3)])
    assert cut.finish_reason == "length" and cut.token_ids == together[0].token_ids[:3]
    assert cut.done_event.prompt_tokens == len(cut.prompt_ids) and cut.done_event.completion_tokens == 3


def test_blocked_request_gets_the_refusal_without_a_row(vlm, pixels):
    policy = parse_policy({"rules": {"fairness": {"block": 3}}, "refusal": "Blocked by policy."})
    blocking = SafeVLMInference(vlm.model, vlm.tokenizer, vlm.images, policy=policy)
    e = own_engine(blocking)
    log = Log()
    risky, clean = run(e, [request(pixels, "risky"), request(pixels, "clean", max_tokens=4)], log)
    e.shutdown()
    assert risky.action == "block" and risky.verdict.risk_level == 3
    assert [ev.kind for ev in log.of(0)] == ["verdict", "text", "done"] and risky.text == "Blocked by policy."
    assert risky.finish_reason == "blocked" and risky.token_ids == [] and risky.done_event.completion_tokens == 0
    assert clean.action == "none" and clean.finish_reason == "length"
    assert e.stats().prompt_tokens == len(clean.prompt_ids) and e.stats().finished["blocked"] == 1


def test_cancel_frees_the_row_and_ends_with_cancelled(engine, pixels):
    log = Log()
    handles = []

    def cancel_on_first_text(event):
        log(0)(event)
        if event.kind == "text":
            handles[0].cancel()

    handles.append(engine.submit(request(pixels, "clean", max_tokens=60), cancel_on_first_text))
    assert handles[0].wait(60)
    assert handles[0].finish_reason == "cancelled" and len(handles[0].token_ids) <= 3
    assert engine.stats().active_slots == 0
    [after] = run(engine, [request(pixels, "clean", max_tokens=4)])
    assert after.finish_reason == "length"


def test_cancel_while_queued_and_shutdown_without_drain(vlm, pixels):
    e = Engine.from_inference(vlm, **DEMO_ENGINE, max_queue=2)  # not started: requests wait
    log = Log()
    first = e.submit(request(pixels, "clean"), log(0))
    second = e.submit(request(pixels, "risky"), log(1))
    with pytest.raises(QueueFull, match="2 requests"):
        e.submit(request(pixels, "clean"))
    first.cancel()
    e.shutdown(drain=False)
    assert first.finish_reason == second.finish_reason == "cancelled"
    assert [ev.kind for ev in log.of(0)] == ["verdict", "done"] and first.verdict is None
    with pytest.raises(EngineClosed):
        e.submit(request(pixels, "clean"))
    stats = e.stats()
    assert stats.accepted == 2 == stats.finished["cancelled"] and not stats.running


def test_shutdown_drains_within_its_timeout_then_cancels_the_rest(vlm, pixels):
    e = own_engine(vlm)
    short = e.submit(request(pixels, "clean", max_tokens=2))
    assert short.wait(60)
    slow = threading.Event()

    def slowly(event):  # each event takes a while: the request cannot end within the timeout
        slow.wait(0.2)

    long = e.submit(request(pixels, "clean", max_tokens=90), slowly)
    queued = e.submit(request(pixels, "risky", max_tokens=90))
    e.shutdown(drain=True, timeout=1.0)
    assert long.finish_reason == queued.finish_reason == "cancelled" and short.finish_reason == "length"
    stats = e.stats()
    assert not stats.running and stats.accepted == sum(stats.finished.values()) == 3


def test_bad_requests_are_refused_at_submit_with_the_field_and_code(engine, pixels):
    with pytest.raises(BadRequest, match=f"exceeds the context length {engine.max_length}") as e:
        engine.submit(request(pixels, "clean", max_tokens=engine.max_length))
    assert (e.value.param, e.value.code) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(BadRequest, match=r"pixel_values must be .* \[64, 64, 3\]"):
        engine.submit(EngineRequest(np.zeros((32, 32, 3), np.float32), "Hi"))
    for bad, field in ((dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
                       (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(top_k=2**31), "top_k"),
                       (dict(seed=2**70), "seed"), (dict(prompt_format="chatml"), "prompt_format")):
        with pytest.raises(BadRequest) as e:
            engine.submit(request(pixels, "clean", **bad))
        assert e.value.param == field
    assert engine.stats().queue_depth == 0


def test_an_exception_for_one_request_fails_that_request_only(vlm, pixels, together, monkeypatch):
    engine = own_engine(vlm)  # its runner's state is broken on purpose below
    real_prefill = Runner.prefill

    def failing_once(self, *a, **kw):  # the first prefill: the first request's (FIFO)
        if not failing_once.failed:
            failing_once.failed = True
            raise RuntimeError("prefill broke")
        return real_prefill(self, *a, **kw)

    failing_once.failed = False
    monkeypatch.setattr(Runner, "prefill", failing_once)
    broken, fine = run(engine, [request(pixels, "risky", max_tokens=24), request(pixels, "clean", max_tokens=24)])
    monkeypatch.undo()
    assert broken.finish_reason == "error" and "prefill broke" in broken.done_event.error
    assert fine.token_ids == together[0].token_ids

    def raising(event):
        if event.kind == "text":
            raise ValueError("client gone")

    angry = engine.submit(request(pixels, "low_risk", max_tokens=24), raising)
    calm = engine.submit(request(pixels, "clean", max_tokens=24))
    assert angry.wait(60) and calm.wait(60)
    assert angry.finish_reason == "error" and "client gone" in angry.done_event.error
    assert calm.token_ids == together[0].token_ids

    real_step = Runner.step

    def lost(self, rows, length, bitmask=None):  # as if the donated state had been consumed by a failed step
        for buf in self.state.cache.k:
            buf.delete()
        raise RuntimeError("device lost")

    monkeypatch.setattr(Runner, "step", lost)
    [gone] = run(engine, [request(pixels, "clean", max_tokens=24)])
    monkeypatch.setattr(Runner, "step", real_step)
    assert gone.finish_reason == "error" and "device lost" in gone.done_event.error
    assert run(engine, [request(pixels, "clean", max_tokens=24)])[0].token_ids == together[0].token_ids
    stats = engine.stats()
    engine.shutdown()
    assert stats.accepted == sum(stats.finished.values()) and stats.active_slots == 0


def test_text_only_and_hf_format_requests_and_moderation(vlm, engine, pixels, together):
    text, hf = run(engine, [EngineRequest(None, "Say hello.", max_tokens=5),
                            request(pixels, "clean", max_tokens=5, prompt_format="hf")])
    assert text.verdict is None and text.finish_reason in ("stop", "length") and text.token_ids
    assert vlm.model.config.image_token_index not in text.prompt_ids
    assert hf.prompt_ids == vlm.gate.builders[(True, "hf")].build(QUESTIONS[0])
    assert_same_verdicts([hf.verdict], [together[0].verdict])
    assert_same_verdicts(engine.moderate(np.stack([pixels[n] for n in EXAMPLES])), [h.verdict for h in together[:4]])
    stats = engine.stats()
    assert stats.slots == 8 and stats.tokens_generated > 0 and stats.queue_depth == 0
    assert stats.verdicts_by_level and stats.decode_step_s > 0
