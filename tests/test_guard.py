"""Guard mode: the verdict-only program equals the full model's head and never runs the LLM."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from safevlm_jax.guard.model import Guard, VerdictModel, load_verdict_model
from safevlm_jax.inference.programs import verdict_program
from safevlm_jax.models import llama
from safevlm_jax.models.safevlm import SafeVLM
from tests.guard_helpers import LLM_MLP, tiny_checkpoint, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def guard(model):
    return Guard(model, query_id=1)


def inputs(model, batch=3, seed=0):
    """Pixels and prompts as the full model takes them: some rows left-padded."""
    c = model.config
    rng = np.random.default_rng(seed)
    pixels = rng.normal(size=(batch, c.vision.image_size, c.vision.image_size, 3)).astype(np.float32)
    n = model.num_image_tokens()
    ids = np.full((batch, n + 8), c.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for b in range(batch):
        pad = 2 * b  # row b: 2b padding tokens on the left, then BOS, the image, the question
        row = [1] + [c.image_token_index] * n + list(rng.integers(3, 400, size=7 - 2 * b))
        ids[b, pad:pad + len(row)], mask[b, pad:pad + len(row)] = row, 1
    return pixels, ids, mask


def full_model_probs(model, pixels, ids, mask):
    out = model(ids, pixels, mask)
    return np.asarray(jax.nn.softmax(out.level_logits)), np.asarray(jax.nn.softmax(out.type_logits))


def test_verdict_only_probabilities_equal_full_model_head_output(model, guard):
    """The full model reads whole left-padded prompts; the guard only BOS, the head's query."""
    pixels, ids, mask = inputs(model)
    want_level, want_type = full_model_probs(model, pixels, ids, mask)
    assert guard.batch_multiple == jax.local_device_count()  # data-parallel over all devices
    level, kind = guard(pixels)
    np.testing.assert_allclose(level, want_level, atol=1e-6)
    np.testing.assert_allclose(kind, want_type, atol=1e-6)
    level_8, kind_8 = guard(pixels, pad_to=8)
    np.testing.assert_allclose(level_8, want_level, atol=1e-6)
    np.testing.assert_allclose(kind_8, want_type, atol=1e-6)


def test_verdict_program_contains_no_decoder_layer(model, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the guard ran an LLM decoder layer")

    monkeypatch.setattr(llama.LlamaDecoderLayer, "__call__", forbidden)
    monkeypatch.setattr(llama.LlamaForCausalLM, "__call__", forbidden)
    graphdef, state = nnx.split(VerdictModel(model))
    pixels, _, _ = inputs(model, batch=2)
    jaxpr = jax.make_jaxpr(lambda s, p, q: verdict_program(graphdef, s, p, q, verdict=True))(
        state, pixels, np.ones(2, np.int32))
    shapes = [tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in list(eqn.invars) + eqn.outvars
              if hasattr(v, "aval")]
    assert shapes and not [s for s in shapes if LLM_MLP in s]
    # Not even passed in: of the language model only the embedding table is in the state.
    lm_paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)
                if p[0] == "embed_tokens" or "language_model" in map(str, p)]
    assert lm_paths == ["embed_tokens/embedding"]


def test_guard_from_checkpoint_loads_only_verdict_parts_and_agrees(model):
    verdict = load_verdict_model(tiny_checkpoint())
    params = nnx.state(verdict, nnx.Param)
    assert not any(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(params))
    pixels, ids, mask = inputs(model, seed=1)
    want_level, want_type = full_model_probs(model, pixels, ids, mask)
    level, kind = Guard(verdict, query_id=1)(pixels, pad_to=8)
    np.testing.assert_allclose(level, want_level, atol=1e-6)
    np.testing.assert_allclose(kind, want_type, atol=1e-6)


def test_guard_refuses_a_model_without_safety_modules(tiny_config):
    config = tiny_config.replace(safety=dataclasses.replace(tiny_config.safety, enabled=False))
    model = nnx.eval_shape(lambda: SafeVLM(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="no safety modules"):
        Guard(model, query_id=1)
