"""On 8 fake CPU devices the sharded step equals the single-device step, and k microbatches
on one device under the fsdp_tensor rules (what one GPU runs) equal one big batch (stage 2
with the safety modules also trained, so both kinds of parameter are covered)."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from configs.train_common import LORA, SAFETY_MODULES
from safevlm_jax import sharding
from safevlm_jax.checkpoint.io import path_str
from safevlm_jax.train.step import jit_train_step, make_train_step

from train_helpers import build, random_batch, tiny_train_config

STEPS = 2


@functools.cache
def run(mesh_shape: tuple, rules: str, accumulation: int):
    """(losses, trained params) after STEPS steps on a fixed 8-row batch."""
    cfg = tiny_train_config(2, **{"model.lora.dropout": 0.0, "trainable": (LORA, SAFETY_MODULES)})
    mcfg, graphdef, state, optimizer, schedule = build(cfg, total_steps=10)
    devices = jax.devices()[:int(np.prod([n for _, n in mesh_shape]))]
    mesh = sharding.make_mesh(dict(mesh_shape), devices)
    batch = random_batch(mcfg, 8)
    step_fn, state_sh, batch_sh = jit_train_step(
        make_train_step(graphdef, optimizer, schedule, accumulation=accumulation,
                        head_weight=cfg.head_weight),
        jax.eval_shape(lambda: state), jax.eval_shape(lambda: batch), mesh, rules)
    state = jax.device_put(state, state_sh)
    losses = []
    for _ in range(STEPS):
        state, metrics = step_fn(state, jax.device_put(batch, batch_sh))
        losses.append(float(metrics["loss"]))
    params = {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state.trainable)}
    return np.array(losses), params


def assert_same(a, b):
    np.testing.assert_allclose(a[0], b[0], rtol=2e-5)
    for k in a[1]:
        np.testing.assert_allclose(a[1][k], b[1][k], rtol=1e-4, atol=1e-5, err_msg=k)  # Adam magnifies ~1e-9 grad noise


@pytest.mark.parametrize("rules,mesh_shape", [
    ("data", (("data", 8),)),
    ("fsdp", (("fsdp", 8),)),
    ("fsdp_tensor", (("fsdp", 4), ("tensor", 2))),
])
def test_sharded_step_equals_single_device_step(rules, mesh_shape):
    assert_same(run(mesh_shape, rules, 1), run((("data", 1),), "replicated", 1))


def test_k_microbatches_on_one_device_with_fsdp_tensor_rules_equal_one_big_batch():
    """What one GPU runs (the fsdp_tensor rules over a 1 x 1 mesh) in 4 microbatches equals the
    replicated step on the whole batch: one compiled program for both properties."""
    assert_same(run((("fsdp", 1), ("tensor", 1)), "fsdp_tensor", 4), run((("data", 1),), "replicated", 1))
