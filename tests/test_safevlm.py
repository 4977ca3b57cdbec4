"""The whole model: LLaVA parity with HF, safety verdict properties, sharding, 7B size."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from configs.model import model_config
from safevlm_jax import sharding
from safevlm_jax.config import SafetyConfig
from safevlm_jax.models.safevlm import SafeVLM, merge_image_embeddings
from tests.hf_llava import TINY_SAFETY, tiny_llava_config
from tests.hf_weights import copy_llava


def hf_and_ours(tie=False, kv_heads=2, scan=False, safety=SafetyConfig(enabled=False), seed=0):
    torch.manual_seed(seed)
    hf = transformers.LlavaForConditionalGeneration(tiny_llava_config(tie, kv_heads)).eval()
    with torch.no_grad():  # HF zero-inits biases and sets unit norms: randomise everything
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    from safevlm_jax.config import ModelConfig

    config = ModelConfig.from_hf(hf.config, safety=safety, scan_layers=scan)
    ours = SafeVLM(config, rngs=nnx.Rngs(seed))
    copy_llava(ours, hf)
    return hf, ours


@pytest.fixture(scope="module")
def ours():
    """The tiny SafeVLM with safety modules (read only: tests that change it build their own)."""
    return hf_and_ours(safety=TINY_SAFETY)[1]


def prompt(model, rng, text_before=3, text_after=5, use_safety=True):
    """[BOS, words, <image> x n, words] as int32 ids."""
    c = model.config
    words = lambda n: rng.integers(3, 400, size=n).tolist()
    ids = [1] + words(text_before) + [c.image_token_index] * model.num_image_tokens(use_safety) + words(text_after)
    return np.asarray(ids, np.int32)


def images(model, n, seed=0):
    s = model.config.vision.image_size
    return np.random.default_rng(seed).normal(size=(n, s, s, 3)).astype(np.float32)


@pytest.mark.parametrize("tie,kv_heads,scan", [(False, 2, False), (True, 2, False), (False, 4, True)])
def test_llava_logits_match_hf_llava(tie, kv_heads, scan):
    hf, ours = hf_and_ours(tie, kv_heads, scan)
    rng = np.random.default_rng(0)
    ids = np.stack([prompt(ours, rng), prompt(ours, rng)])
    pix = images(ours, 2)
    mask = np.ones_like(ids)
    got = ours(jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask), use_safety=False)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                  pixel_values=torch.tensor(pix.transpose(0, 3, 1, 2)),
                  attention_mask=torch.tensor(mask)).logits.numpy()
    assert got.level_logits is None
    np.testing.assert_allclose(np.asarray(got.logits), want, atol=1e-4, rtol=1e-4)


def test_bf16_logits_are_as_close_to_the_f32_reference_as_hf_in_bf16():
    """bf16 weights and compute: our logits differ from HF's f32 ones by bf16 rounding, no
    more than HF's own bf16 model does (relative norm of the difference; bf16 operands give
    1e-3 to 1e-2)."""
    hf, ours = hf_and_ours()
    ours16 = SafeVLM(ours.config.replace(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    copy_llava(ours16, hf)
    rng = np.random.default_rng(5)
    ids = np.stack([prompt(ours, rng), prompt(ours, rng)])
    pix, mask = images(ours, 2), np.ones(ids.shape, np.int32)
    inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    with torch.no_grad():
        want = hf(pixel_values=torch.tensor(pix.transpose(0, 3, 1, 2)), **inputs).logits.numpy()
        theirs = copy.deepcopy(hf).to(torch.bfloat16)(
            pixel_values=torch.tensor(pix.transpose(0, 3, 1, 2)).to(torch.bfloat16), **inputs).logits
    got = ours16(jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask), use_safety=False).logits
    err = lambda x: float(np.linalg.norm(np.asarray(x, np.float32) - want) / np.linalg.norm(want))
    ours_err, hf_err = err(got), err(theirs.float().numpy())
    assert 0 < ours_err < 2e-2 and ours_err < 1.5 * hf_err, (ours_err, hf_err)


def test_left_padded_batch_equals_each_row_alone(ours):
    rng = np.random.default_rng(1)
    rows = [prompt(ours, rng, 2, 9), prompt(ours, rng, 4, 2)]
    width = max(len(r) for r in rows)
    ids = np.full((2, width), ours.config.pad_token_id, np.int32)
    mask = np.zeros((2, width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    pix = images(ours, 2)
    batch = ours(jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask))
    for i, r in enumerate(rows):
        alone = ours(jnp.asarray(r[None]), jnp.asarray(pix[i:i + 1]), jnp.ones((1, len(r)), jnp.int32))
        np.testing.assert_allclose(batch.logits[i, width - len(r):], alone.logits[0], atol=1e-5)
        np.testing.assert_allclose(batch.level_logits[i], alone.level_logits[0], atol=1e-5)
        np.testing.assert_allclose(batch.type_logits[i], alone.type_logits[0], atol=1e-5)


def test_verdict_reads_only_the_image_and_the_first_token(ours):
    rng = np.random.default_rng(2)
    ids = prompt(ours, rng)[None]
    other_text = ids.copy()
    other_text[0, -3:] = (other_text[0, -3:] + 7) % 400 + 3
    mask, pix = jnp.ones(ids.shape, jnp.int32), jnp.asarray(images(ours, 1))
    base = ours(jnp.asarray(ids), pix, mask)
    np.testing.assert_array_equal(ours(jnp.asarray(other_text), pix, mask).level_logits, base.level_logits)
    assert not np.allclose(ours(jnp.asarray(ids), pix + 1.0, mask).level_logits, base.level_logits)


def test_pad_query_token_reads_the_pad_embedding_whatever_the_first_token(ours):
    """SafetyConfig.query_token="pad" (the authors' training code put <pad> at position 0)."""
    import dataclasses

    c = ours.config
    padded = SafeVLM(c.replace(safety=dataclasses.replace(c.safety, query_token="pad")), rngs=nnx.Rngs(0))
    nnx.update(padded, nnx.state(ours, nnx.Param))
    rng = np.random.default_rng(4)
    ids = prompt(ours, rng)[None]
    mask, pix = jnp.ones(ids.shape, jnp.int32), jnp.asarray(images(ours, 1))
    features = ours.image_features(pix)
    pad_query = ours.embed_text(jnp.full((1, 1), c.pad_token_id, jnp.int32))[:, 0]
    want = ours.safety_logits(features, pad_query)
    other = ids.copy()
    other[0, 0] = 5  # another first token: the pad query does not read it
    for row in (ids, other):
        got = padded(jnp.asarray(row), pix, mask)
        np.testing.assert_allclose(got.level_logits, want[0], atol=1e-6)
        np.testing.assert_allclose(got.type_logits, want[1], atol=1e-6)
    assert not np.allclose(ours(jnp.asarray(ids), pix, mask).level_logits, want[0])


def test_image_positions_hold_safety_tokens_then_projected_features(ours):
    ids = jnp.asarray(prompt(ours, np.random.default_rng(3))[None])
    pix = jnp.asarray(images(ours, 1))
    features = ours.image_features(pix)
    merged = merge_image_embeddings(ours.embed_text(ids), ids, ours.image_embeddings(features),
                                    ours.config.image_token_index)
    start = int(np.argmax(np.asarray(ids[0]) == ours.config.image_token_index))
    n_tok = ours.config.safety.num_tokens
    np.testing.assert_array_equal(merged[0, start:start + n_tok], ours.safety_tokens_llm[...])
    np.testing.assert_allclose(merged[0, start + n_tok:start + ours.num_image_tokens()],
                               ours.multi_modal_projector(features)[0], atol=1e-6)
    np.testing.assert_array_equal(merged[0, :start], ours.embed_text(ids)[0, :start])


@pytest.fixture(scope="module")
def unsharded(ours):
    """(ids, pixels, mask) of 8 rows, and the model's output for them on one device."""
    rng = np.random.default_rng(4)
    ids = jnp.asarray(np.stack([prompt(ours, rng) for _ in range(8)]))
    pix, mask = jnp.asarray(images(ours, 8)), jnp.ones(ids.shape, jnp.int32)
    return (ids, pix, mask), ours(ids, pix, mask)


@pytest.mark.parametrize("rules,mesh_shape", [
    ("fsdp", {"fsdp": 8}), ("fsdp_tensor", {"fsdp": 4, "tensor": 2}),
    ("fsdp_tensor", {"data": 2, "fsdp": 2, "tensor": 2}),
    pytest.param("fsdp_tensor", {"fsdp": 1, "tensor": 1}, id="one_device"),  # what one GPU runs
])
def test_sharded_forward_equals_unsharded(ours, unsharded, rules, mesh_shape):
    (ids, pix, mask), want = unsharded

    n = int(np.prod(list(mesh_shape.values())))
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:n])
    graphdef, state = nnx.split(ours)
    state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
    batch = [jax.device_put(x, sharding.data_sharding(mesh, rules, x.ndim)) for x in (ids, pix, mask)]

    @jax.jit
    def forward(state, ids, pix, mask):
        with sharding.use_rules(mesh, rules):
            return nnx.merge(graphdef, state)(ids, pix, mask)

    got = forward(state, *batch)
    assert len(got.logits.sharding.device_set) == n
    for g, w in zip(got[:3], want[:3]):
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_llava_7b_has_the_published_parameter_count_plus_safety_modules():
    model = nnx.eval_shape(lambda: SafeVLM(model_config("llava_7b"), rngs=nnx.Rngs(0)))
    counts = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        counts[path[0]] = counts.get(path[0], 0) + int(np.prod(var.get_value().shape))
    llava = counts.pop("vision_tower") + counts.pop("multi_modal_projector") + counts.pop("language_model")
    assert llava == 7_063_427_072  # llava-hf/llava-1.5-7b-hf
    # C-Abstractor 40,115,920 + head 67,170,315 (derived in test_safety_modules) + 2 x 64 x 4096
    assert sum(counts.values()) == 40_115_920 + 67_170_315 + 2 * 64 * 4096
    assert set(counts) == {"safety_projector", "safety_head", "safety_tokens_head", "safety_tokens_llm"}
