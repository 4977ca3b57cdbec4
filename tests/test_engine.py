"""The continuous-batching engine on the shipped demo checkpoint: a request's greedy tokens are
the same alone, among 7 others and from `Decoder.generate`; freed slots refill while others
decode; nothing recompiles after warm-up; per-row sampling; EOS and max_tokens; the policy's
block; cancel; errors inside the loop; queue and context limits."""

import os
import threading

import jax
import numpy as np
import pytest

from safevlm_jax.checkpoint.demo import DEMO_DIR
from safevlm_jax.inference import engine as engine_module
from safevlm_jax.inference.engine import Engine, EngineClosed, EngineRequest, QueueFull
from safevlm_jax.inference.errors import BadRequest
from safevlm_jax.inference.pipeline import Request, SafeVLMInference, load_image
from safevlm_jax.safety.policy import parse_policy
from safevlm_jax.safety.prompt import PromptBuilder

_COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: _COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
EXAMPLES = ("clean", "low_risk", "medium_risk", "risky")
QUESTIONS = ("What is shown in this image?", "Describe the picture.")
LENGTH = 256  # the engine's context: prompts (114 tokens + a hint) fit one bucket


@pytest.fixture(scope="module")
def vlm():
    return SafeVLMInference.from_checkpoint(DEMO_DIR)


@pytest.fixture(scope="module")
def pixels(vlm):
    return {name: load_image(os.path.join(DEMO_DIR, "examples", f"{name}.png"), vlm.images) for name in EXAMPLES}


@pytest.fixture(scope="module")
def engine(vlm):
    e = Engine(vlm, slots=8, max_queue=16, max_length=LENGTH).start()
    yield e
    e.shutdown()


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


def test_greedy_tokens_among_seven_others_equal_alone_and_decoder_generate(vlm, engine, eight, together):
    alone = [run(engine, [r])[0] for r in eight]
    assert [h.token_ids for h in together] == [h.token_ids for h in alone]
    assert [h.text for h in together] == [h.text for h in alone]
    paths = [os.path.join(DEMO_DIR, "examples", f"{n}.png") for n in EXAMPLES]
    want = vlm.answer([Request(p, q) for q in QUESTIONS for p in paths], max_new_tokens=24)
    assert [h.token_ids for h in together] == [r.token_ids for r in want]
    assert [h.text for h in together] == [r.answer for r in want]
    assert_same_verdicts([h.verdict for h in together], [r.verdict for r in want])
    assert {h.finish_reason for h in together} <= {"stop", "length"}


def test_safety_off_is_plain_llava_equal_to_decoder_generate(vlm, engine, pixels):
    [off] = run(engine, [request(pixels, "risky", max_tokens=8, safety=False)])
    [want] = vlm.answer([Request(os.path.join(DEMO_DIR, "examples", "risky.png"), QUESTIONS[0])],
                        max_new_tokens=8, safety=False)
    assert off.verdict is None and off.action is None
    assert off.token_ids == want.token_ids and off.text == want.answer
    assert len(off.prompt_ids) == len(vlm.builders[False].build(QUESTIONS[0]))  # no safety tokens


def test_a_freed_slot_is_refilled_while_the_others_keep_decoding(engine, pixels, eight, together):
    log = Log()
    short = request(pixels, "clean", max_tokens=2)
    late = request(pixels, "risky", QUESTIONS[1], max_tokens=24)  # the 9th: waits for a slot
    handles = run(engine, [short] + eight[1:] + [late], log)
    order = [(tag, e.kind) for tag, e in log.events]
    refilled = order.index((8, "verdict"))
    assert order.index((0, "done")) < refilled
    long_done = [order.index((i, "done")) for i in range(1, 8) if len(together[i].token_ids) > 6]
    assert long_done and refilled < min(long_done)  # the others were still decoding
    assert handles[0].token_ids == together[0].token_ids[:2] and handles[0].finish_reason == "length"
    assert [h.token_ids for h in handles[1:8]] == [h.token_ids for h in together[1:8]]
    assert handles[8].token_ids == together[7].token_ids  # same request as the 8th, other slot


def test_nothing_recompiles_after_warm_up(engine, pixels, together):
    engine.compile_decode_steps(timeout=300)  # every (rows, length) bucket of the decode step
    for n in (1, 2, 4, 8):  # verdict batch buckets (the engine's verdicts run this program)
        engine.moderate(np.stack([pixels["clean"]] * n))
    run(engine, [request(pixels, "clean", temperature=0.7, top_p=0.9)])
    before = len(_COMPILES)
    questions = ["Hi?", "What colour is the shape, and which letter is written on it?", "Shape?"]
    mixed = [request(pixels, name, q, max_tokens=m, temperature=t, top_p=p, top_k=k, seed=s)
             for name, q, m, t, p, k, s in zip(EXAMPLES * 2, questions * 3, (3, 9, 17, 5, 30, 1, 12),
                                               (0, 0.8, 1.3, 0, 0.5, 2.0, 0.9), (1, 0.9, 1, 1, 0.5, 1, 0.95),
                                               (0, 0, 5, 0, 3, 1, 0), range(7))]
    run(engine, mixed)
    run(engine, mixed[:3])
    assert len(_COMPILES) == before, _COMPILES[before:]


def test_each_row_keeps_its_own_sampling_settings_among_others(engine, pixels, together):
    sampled = request(pixels, "low_risk", max_tokens=24, temperature=1.5, seed=11)
    top1 = request(pixels, "clean", max_tokens=24, temperature=1.0, top_k=1, seed=5)
    handles = run(engine, [sampled, top1] + [request(pixels, "medium_risk", temperature=1.5, seed=s)
                                             for s in range(6)])
    assert handles[0].token_ids == run(engine, [sampled])[0].token_ids
    assert handles[1].token_ids == together[0].token_ids  # top-k 1 is greedy
    assert len({tuple(h.token_ids) for h in handles[2:]}) > 1  # seeds differ, draws differ


def test_stops_at_eos_or_max_tokens(vlm, engine, pixels, together):
    eos = vlm.tokenizer.eos_token_id
    [done] = [h for h in together if h.finish_reason == "stop"][:1]
    assert done.token_ids[-1] == eos and eos not in done.token_ids[:-1]
    assert done.done_event.completion_tokens == len(done.token_ids)
    assert done.text == vlm.tokenizer.decode(done.token_ids[:-1], skip_special_tokens=True)
    [cut] = run(engine, [request(pixels, "clean", max_tokens=3)])
    assert cut.finish_reason == "length" and cut.token_ids == together[0].token_ids[:3]
    assert cut.done_event.prompt_tokens == len(cut.prompt_ids) and cut.done_event.completion_tokens == 3


def test_blocked_request_gets_the_refusal_without_a_slot(vlm, pixels):
    policy = parse_policy({"rules": {"fairness": {"block": 3}}, "refusal": "Blocked by policy."})
    blocking = SafeVLMInference(vlm.model, vlm.tokenizer, vlm.images, policy=policy)
    e = Engine(blocking, slots=8, max_length=LENGTH).start()
    log = Log()
    risky, clean = run(e, [request(pixels, "risky"), request(pixels, "clean", max_tokens=4)], log)
    e.shutdown()
    assert risky.action == "block" and risky.verdict.risk_level == 3
    assert [ev.kind for ev in log.of(0)] == ["verdict", "text", "done"] and risky.text == "Blocked by policy."
    assert risky.finish_reason == "blocked" and risky.token_ids == [] and risky.done_event.completion_tokens == 0
    assert clean.action == "none" and clean.finish_reason == "length"
    assert e.stats()["prefills"] == 1 and e.stats()["finished"]["blocked"] == 1


def test_cancel_frees_the_slot_and_ends_with_cancelled(engine, pixels):
    log = Log()
    handles = []

    def cancel_on_first_text(event):
        log(0)(event)
        if event.kind == "text":
            handles[0].cancel()

    handles.append(engine.submit(request(pixels, "clean", max_tokens=60), cancel_on_first_text))
    assert handles[0].wait(60)
    assert handles[0].finish_reason == "cancelled" and len(handles[0].token_ids) <= 3
    assert engine.stats()["active_slots"] == 0
    [after] = run(engine, [request(pixels, "clean", max_tokens=4)])
    assert after.finish_reason == "length"


def test_cancel_while_queued_and_shutdown_without_drain(vlm, pixels):
    e = Engine(vlm, slots=8, max_queue=2, max_length=LENGTH)  # not started: requests wait
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


def test_shutdown_without_drain_cancels_requests_in_their_slots(vlm, pixels):
    e = Engine(vlm, slots=8, max_length=LENGTH).start()
    stopper = threading.Thread(target=e.shutdown, kwargs={"drain": False})

    def stop_on_first_text(event):
        if event.kind == "text" and stopper.ident is None:  # not started yet
            stopper.start()

    handle = e.submit(request(pixels, "clean", max_tokens=60), stop_on_first_text)
    assert handle.wait(60) and handle.finish_reason == "cancelled"
    stopper.join(60)
    assert not e.stats()["running"] and e.stats()["active_slots"] == 0


def test_bad_requests_are_refused_at_submit_naming_the_limit(engine, pixels):
    with pytest.raises(BadRequest, match=f"exceeds the context length {LENGTH}"):
        engine.submit(request(pixels, "clean", max_tokens=LENGTH))
    with pytest.raises(BadRequest, match=r"pixel_values must be .* \[64, 64, 3\]"):
        engine.submit(EngineRequest(np.zeros((32, 32, 3), np.float32), "Hi"))
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2),
                dict(prompt_format="chatml")):
        with pytest.raises(BadRequest):
            engine.submit(request(pixels, "clean", **bad))


def test_an_exception_in_the_loop_fails_only_its_requests(engine, pixels, together, monkeypatch):
    real = engine_module.programs.decode_step
    calls = {"n": 0}

    def failing_once(graphdef, state, cache, *args, **shape):
        calls["n"] += 1
        if calls["n"] == 2:
            for buf in cache.k:  # as if the donated cache had been consumed
                buf.delete()
            raise RuntimeError("device lost")
        return real(graphdef, state, cache, *args, **shape)

    monkeypatch.setattr(engine_module.programs, "decode_step", failing_once)
    failed = run(engine, [request(pixels, "clean", max_tokens=24)])[0]
    assert failed.finish_reason == "error" and "device lost" in failed.done_event.error
    [ok] = run(engine, [request(pixels, "clean", max_tokens=24)])
    assert ok.token_ids == together[0].token_ids
    monkeypatch.setattr(engine.decoder, "encode", lambda *a: 1 / 0)
    [broken] = run(engine, [request(pixels, "clean")])
    assert broken.finish_reason == "error" and "ZeroDivisionError" in broken.done_event.error
    monkeypatch.undo()
    real_prompt = engine._prompt
    monkeypatch.setattr(engine, "_prompt", lambda r, hint: real_prompt(r, hint) if hint is None else 1 / 0)
    hinted, plain = run(engine, [request(pixels, "low_risk"), request(pixels, "clean", max_tokens=24)])
    assert hinted.verdict.hint and hinted.finish_reason == "error" and "ZeroDivisionError" in hinted.done_event.error
    monkeypatch.undo()
    assert plain.token_ids == together[0].token_ids
    assert run(engine, [request(pixels, "clean", max_tokens=24)])[0].token_ids == together[0].token_ids


def test_text_only_and_hf_format_requests_and_moderation(vlm, engine, pixels, together):
    text, hf = run(engine, [EngineRequest(None, "Say hello.", max_tokens=5),
                            request(pixels, "clean", max_tokens=5, prompt_format="hf")])
    assert text.verdict is None and text.finish_reason in ("stop", "length") and text.token_ids
    assert vlm.model.config.image_token_index not in text.prompt_ids
    builder = PromptBuilder(vlm.tokenizer, vlm.model.num_image_tokens(True), vlm.builders[True].template,
                            vlm.hints, prompt_format="hf")
    assert hf.prompt_ids == builder.build(QUESTIONS[0])
    assert_same_verdicts([hf.verdict], [together[0].verdict])
    assert_same_verdicts(engine.moderate(np.stack([pixels[n] for n in EXAMPLES])), [h.verdict for h in together[:4]])
    stats = engine.stats()
    assert stats["slots"] == 8 and stats["tokens_generated"] > 0 and stats["queue_depth"] == 0
    assert stats["verdicts_by_level"] and stats["decode_step_s"] > 0
