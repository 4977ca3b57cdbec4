"""The decode step's per-row logits rules (`inference.logits`) and constrained decoding
(`inference.constraints`) on the engine over the demo model: OpenAI's penalties, llguidance's
bit layout, and a grammar's mask that never blocks EOS where the grammar accepts."""

import json
import os

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from llguidance.numpy import apply_token_bitmask_inplace

from safevlm_jax.checkpoint.demo import DEMO_DIR
from safevlm_jax.inference.engine import Engine, EngineRequest
from safevlm_jax.inference.logits import RowLogits, apply_mask, penalize
from safevlm_jax.inference.pipeline import SafeVLMInference, load_image
from safevlm_jax.inference.requests import SamplingParams

SCHEMA = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["colour", "n"], "additionalProperties": False}


def test_penalties_are_openais_per_row():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 11)).astype(np.float32)
    history = np.array([[1, 1, 4, 0], [2, 3, 3, 3], [5, 5, 5, 5]], np.int32)
    steps = np.array([3, 4, 2], np.int32)
    rows = RowLogits.of([SamplingParams(presence_penalty=0.5, frequency_penalty=1.0),
                         SamplingParams(presence_penalty=-1.0), SamplingParams()])
    got = np.asarray(jax.jit(penalize)(logits, rows, history, steps))
    want = logits.copy()
    for b in range(3):
        counts = np.bincount(history[b, :steps[b]], minlength=11)
        want[b] -= counts * rows.frequency[b] + (counts > 0) * rows.presence[b]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_mask_reads_llguidances_bit_layout():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 70)).astype(np.float32)
    bitmask = rng.integers(-2**31, 2**31, size=(2, 3), dtype=np.int64).astype(np.int32)
    want = logits.copy()
    apply_token_bitmask_inplace(want, bitmask)
    np.testing.assert_array_equal(np.asarray(apply_mask(jnp.asarray(logits), jnp.asarray(bitmask))), want)


@pytest.fixture(scope="module")
def engine():
    vlm = SafeVLMInference.from_checkpoint(DEMO_DIR)
    e = Engine.from_inference(vlm, slots=4, max_length=256).start()
    e.pixels = {n: load_image(os.path.join(DEMO_DIR, "examples", f"{n}.png"), vlm.images)
                for n in ("clean", "risky")}
    yield e
    e.shutdown(drain=False)


def test_constrained_answers_validate_and_the_mask_never_blocks_eos_where_the_grammar_accepts(engine):
    requests = [EngineRequest(engine.pixels[("clean", "risky")[i % 2]], "Describe the colour as JSON.",
                              max_tokens=32, json_schema=SCHEMA, temperature=0 if i < 4 else 1.5, seed=i)
                for i in range(20)]
    handles = [engine.submit(r) for r in requests]
    assert all(h.wait(300) for h in handles)
    grammar = engine.grammars.compile(SCHEMA)
    eos, words, accepted = engine.tokenizer.eos_token_id, engine.executor.mask_words, 0
    for h in handles:
        assert h.finish_reason in ("stop", "length"), h.done_event
        if h.finish_reason == "stop":
            jsonschema.validate(json.loads(h.text), SCHEMA)
            assert h.token_ids[-1] == eos
        row = engine.grammars.matcher(grammar)
        for token in h.token_ids:
            mask = np.zeros(words, np.int32)
            row.fill(mask)
            allowed = bool((mask[eos // 32] >> (eos % 32)) & 1)
            assert allowed == row.accepting()
            accepted += allowed
            if token == eos:
                break
            assert (mask[token // 32] >> (token % 32)) & 1  # every token the step chose was allowed
            row.consume(token)
    assert sum(h.finish_reason == "stop" for h in handles) >= 15 and accepted >= 15
