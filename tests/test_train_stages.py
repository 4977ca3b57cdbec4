"""Stage 1 and stage 2 train exactly their parameters (docs/architecture.md) and the loss goes
down."""

import jax
import numpy as np
import pytest
from flax import nnx

from safevlm_jax import sharding
from safevlm_jax.checkpoint.io import path_str
from safevlm_jax.train.step import jit_train_step, make_train_step

from train_helpers import build, random_batch, tiny_train_config


def flat(state):
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)
            if isinstance(v, nnx.Param)}


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_trains_only_its_parameters_and_loss_decreases(stage):
    cfg = tiny_train_config(stage, **{"model.lora.dropout": 0.0} if stage == 2 else {})
    mcfg, graphdef, state, optimizer, schedule = build(cfg, total_steps=8)
    trained = flat(state.trainable)
    if stage == 1:
        assert {k.split("/")[0] for k in trained} == {
            "safety_tokens_head", "safety_tokens_llm", "safety_projector", "safety_head"}
    else:
        assert trained and all("/lora/lora_" in k and k.startswith("language_model/") for k in trained)
    assert not any(k.split("/")[0].startswith("safety") or "/lora/" in k for k in flat(state.frozen)
                   if (stage == 1 and k.startswith("safety")) or (stage == 2 and "/lora/" in k))
    # AdamW keeps two moments per *trained* leaf and nothing for frozen ones.
    n_trained = sum(v.size for v in trained.values())
    opt_floats = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.dtype == np.float32)
    assert opt_floats == 2 * n_trained

    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    batch = random_batch(mcfg, 4)
    step_fn, state_sh, batch_sh = jit_train_step(
        make_train_step(graphdef, optimizer, schedule, accumulation=1, head_weight=cfg.head_weight),
        jax.eval_shape(lambda: state), jax.eval_shape(lambda: batch), mesh, "replicated")
    before_trained, before_frozen = trained, flat(state.frozen)
    state = jax.device_put(state, state_sh)
    losses = []
    for _ in range(8):
        state, metrics = step_fn(state, jax.device_put(batch, batch_sh))
        losses.append(float(metrics["loss" if stage == 1 else "lm_loss"]))  # LoRA moves only L_LM
    assert losses[-1] < losses[0] - (0.1 if stage == 1 else 0.02), losses
    after_frozen, after_trained = flat(state.frozen), flat(state.trainable)
    for k, v in before_frozen.items():
        np.testing.assert_array_equal(after_frozen[k], v, err_msg=k)
    unchanged = [k for k, v in before_trained.items() if np.array_equal(after_trained[k], v)]
    assert not unchanged
