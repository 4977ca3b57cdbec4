"""Attention by platform (models/attention.py): Pallas splash attention, run on this CPU in
TPU interpret mode, equals the XLA reference (forward and gradients, f32 and bf16, GQA, left
padding and the image-token layout the model feeds it), alone, inside `shard_map` over a
mesh, in the tiny SafeVLM's logits and in one train step. Padding queries are left out of
every comparison: their output is unspecified (`self_attention`'s docstring)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from safevlm_jax import sharding
from safevlm_jax.config import ModelConfig
from safevlm_jax.models import attention
from safevlm_jax.models.safevlm import SafeVLM
from safevlm_jax.train.state import create_state
from safevlm_jax.train.step import jit_train_step, make_train_step

from train_helpers import random_batch, sgd, tiny_train_config

B, H, KVH, DH = 3, 4, 2, 16
# the tiny model's layout: left padding, BOS, 8 safety + 16 image tokens, text (T = 40 is no
# multiple of splash's 128-wide blocks, so the padded tail is exercised too)
PADDING, IMAGE_TOKENS, T = (0, 5, 17), 24, 40
BF16_ATOL = 3e-2  # bf16 inputs (8 bits of mantissa), f32 scores in both: ~2^-7 relative to outputs of size ~1


def inputs(dtype):
    rng = np.random.RandomState(0)
    q, k, v = (rng.randn(B, n, T, DH).astype(np.float32) for n in (H, KVH, KVH))
    valid = np.arange(T)[None] >= np.array(PADDING)[:, None]
    assert all(valid[b, p + 1:p + 1 + IMAGE_TOKENS].all() for b, p in enumerate(PADDING))
    return jnp.asarray(q * DH**-0.5, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(valid)


def loss(implementation, valid):
    """(a loss over the real queries only, with weights that make every output matter; the output)."""
    weights = jnp.asarray(np.random.RandomState(1).randn(B, H, T, DH), jnp.float32) * valid[:, None, :, None]

    def f(q, k, v):
        out = attention.self_attention(q, k, v, valid, causal=True, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    return f


def real(x, valid):
    return np.asarray(x, np.float32)[np.broadcast_to(np.asarray(valid)[:, None, :, None], x.shape)]


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, BF16_ATOL)], ids=["f32", "bf16"])
def test_splash_in_interpret_mode_equals_xla_forward_and_gradients(dtype, atol):
    q, k, v, valid = inputs(dtype)
    (_, ref), grads_ref = jax.jit(jax.value_and_grad(loss("xla", valid), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    with pltpu.force_tpu_interpret_mode():  # one program: outputs and gradients
        (_, out), grads = jax.jit(jax.value_and_grad(loss("splash", valid), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(real(out, valid), real(ref, valid), atol=atol, rtol=0)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), atol=atol * 4, rtol=0,
                                   err_msg=f"d{name}")


def test_cpu_blocks_and_auto_on_cpu_equal_xla():
    q, k, v, valid = inputs(jnp.float32)
    ref = real(attention.self_attention(q, k, v, valid, causal=True, implementation="xla"), valid)
    for name in ("cpu_blocks", "auto"):
        out = jax.jit(functools.partial(attention.self_attention, causal=True, implementation=name))(q, k, v, valid)
        np.testing.assert_allclose(real(out, valid), ref, atol=1e-6, rtol=0, err_msg=name)


def test_splash_in_shard_map_over_batch_and_heads_equals_xla():
    """On a data x tensor mesh (8 fake CPU devices) splash runs per shard: rows over `data`,
    query and kv heads over `tensor`, as the fsdp_tensor rules map `batch` and `act_heads`."""
    q, k, v, valid = inputs(jnp.float32)
    q, k, v, valid = (jnp.concatenate([x, x[:1]]) for x in (q, k, v, valid))  # 4 rows over data=2
    mesh = sharding.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])

    def run(q, k, v, valid):
        with sharding.use_rules(mesh, "fsdp_tensor"):
            return attention.self_attention(q, k, v, valid, causal=True, implementation="splash")

    assert "shard_map" in str(jax.make_jaxpr(run)(q, k, v, valid))
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(run)(q, k, v, valid)
    ref = attention.self_attention(q, k, v, valid, causal=True, implementation="xla")
    np.testing.assert_allclose(real(out, valid), real(ref, valid), atol=1e-5, rtol=0)


def test_shard_map_refuses_kv_heads_split_unlike_query_heads():
    q, k, v, valid = inputs(jnp.float32)
    mesh = sharding.make_mesh({"tensor": 4}, jax.devices()[:4])
    with sharding.use_rules(mesh, "fsdp_tensor", fallback="replicate"), pytest.raises(ValueError, match="act_heads"):
        attention.self_attention(q, k, v, valid, causal=True, implementation="splash")


def test_tiny_safevlm_logits_with_splash_equal_xla(tiny_config):
    """Left-padded prompts with their image, as the sampler feeds the model."""
    mcfg = tiny_config
    batch = random_batch(mcfg, 2, length=48)
    mask = np.ones_like(batch["input_ids"])
    mask[1, :7] = 0  # row 1: 7 tokens of left padding before BOS, image and text
    ids = np.where(mask, batch["input_ids"], mcfg.pad_token_id)
    ids[1, 7:] = batch["input_ids"][1, :-7]
    out = {}
    for name in ("xla", "splash"):  # scanned layers: one layer body to trace and compile
        model = SafeVLM(mcfg.replace(attention=name, scan_layers=True), rngs=nnx.Rngs(0))
        with pltpu.force_tpu_interpret_mode():
            out[name] = nnx.jit(lambda m, *a: m(*a))(model, ids, batch["pixel_values"], mask)
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out["splash"].logits)[keep], np.asarray(out["xla"].logits)[keep],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["splash"].level_logits, out["xla"].level_logits, atol=1e-5, rtol=0)


def test_train_step_with_splash_equals_xla():
    """One stage-2 step (LoRA and the safety modules trained, SGD so the update is the
    gradient) on a fsdp x tensor mesh of 4 fake CPU devices, right-padded rows as the data
    pipeline gives them."""
    results = {}
    for name in ("xla", "splash"):
        cfg = tiny_train_config(2, **{"model.lora.dropout": 0.0, "model.attention": name, "model.scan_layers": True})
        mcfg = ModelConfig.from_dict(cfg.model)
        optimizer, schedule = sgd(1.0)
        graphdef, state = create_state(SafeVLM(mcfg, rngs=nnx.Rngs(params=0, dropout=1)), cfg, optimizer)
        batch = random_batch(mcfg, 4, length=48)
        for row, n in enumerate((48, 40, 44, 48)):
            batch["attention_mask"][row, n:] = 0
            batch["labels"][row, n:] = -100
        mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
        step, state_sh, batch_sh = jit_train_step(
            make_train_step(graphdef, optimizer, schedule, accumulation=1, head_weight=cfg.head_weight),
            jax.eval_shape(lambda: state), jax.eval_shape(lambda: batch), mesh, "fsdp_tensor")
        with pltpu.force_tpu_interpret_mode():
            new, metrics = step(jax.device_put(state, state_sh), jax.device_put(batch, batch_sh))
        results[name] = (float(metrics["loss"]), jax.tree.map(np.asarray, new.trainable))
    assert results["splash"][0] == pytest.approx(results["xla"][0], abs=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                 results["splash"][1], results["xla"][1])
