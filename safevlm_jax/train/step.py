"""The train step: one `jax.jit` over (TrainState, batch) with shardings from logical rules.

Inside, the model is rebuilt with `nnx.merge(graphdef, trainable, frozen)`, so the step is a
pure function of arrays. The global batch [B, ...] is cut into `accumulation` microbatches
(row j goes to microbatch j % k, so every device contributes to every microbatch) and their
gradients are summed with `lax.scan`; losses are normalised by whole-batch counts, so k
microbatches give the one-big-batch gradient.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from safevlm_jax import sharding
from safevlm_jax.data.pipeline import BATCH_KEYS
from safevlm_jax.train import loss as losses
from safevlm_jax.train.state import TrainState

def reseed(frozen, key: jax.Array):
    """Fresh keys for every RNG stream (dropout) in `frozen`, derived from `key` only."""
    leaves, treedef = jax.tree.flatten(frozen, is_leaf=lambda v: isinstance(v, nnx.Variable))
    out = []
    for i, v in enumerate(leaves):
        if isinstance(v, nnx.RngKey):
            shape = v.get_value().shape
            v = v.replace(jax.random.split(jax.random.fold_in(key, i), shape) if shape
                          else jax.random.fold_in(key, i))
        out.append(v)
    return jax.tree.unflatten(treedef, out)


def split_microbatches(batch: dict, k: int) -> dict:
    """[B, ...] -> [k, B/k, ...]; microbatch j holds rows j, j+k, j+2k, ..."""
    def one(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} microbatches")
        x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
    return {key: one(x) for key, x in batch.items()}


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    *, accumulation: int, head_weight: float) -> Callable:
    """(TrainState, batch) -> (TrainState, metrics); not yet jitted (see `jit_train_step`).

    batch: input_ids/labels/attention_mask [B, T] int32, pixel_values [B, H, W, 3] float,
    safe_level/safe_type [B] int32; B = accumulation x microbatch.
    """

    def microbatch_loss(trainable, frozen, mb, num_tokens, num_rows):
        model = nnx.merge(graphdef, trainable, frozen, copy=True)  # fresh Variables in this trace
        out = model(mb["input_ids"], mb["pixel_values"], mb["attention_mask"], lm_head=False)
        sums = losses.loss_sums(out.logits, out.level_logits, out.type_logits, mb["labels"],
                                mb["safe_level"], mb["safe_type"], head=model.language_model.head)
        return losses.total_loss(sums, num_tokens, num_rows, head_weight), sums

    grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

    def train_step(state: TrainState, batch: dict):
        batch = {k: batch[k] for k in BATCH_KEYS}
        num_rows = batch["input_ids"].shape[0]
        num_tokens = losses.num_target_tokens(batch["labels"])
        frozen = reseed(state.frozen, jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))

        def accumulate(carry, mb):
            grads, sums = carry
            (_, mb_sums), mb_grads = grad_fn(state.trainable, frozen, mb, num_tokens, num_rows)
            return (jax.tree.map(jnp.add, grads, mb_grads), jax.tree.map(jnp.add, sums, mb_sums)), None

        zeros = (jax.tree.map(jnp.zeros_like, state.trainable),
                 losses.LossSums(*(jnp.zeros((), jnp.float32),) * len(losses.LossSums._fields)))
        if accumulation == 1:
            (grads, sums), _ = accumulate(zeros, batch)
        else:
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, split_microbatches(batch, accumulation))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = losses.loss_metrics(sums, num_tokens, num_rows, head_weight)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = schedule(state.step)
        return state._replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

    return train_step


def batch_shardings(batch_abstract: dict, mesh: Mesh, rules) -> dict:
    """Every batch array sharded over its leading (batch) axis."""
    return {k: sharding.data_sharding(mesh, rules, x.ndim) for k, x in batch_abstract.items()}


def jit_train_step(train_step: Callable, state_abstract: TrainState, batch_abstract: dict,
                   mesh: Mesh, rules, fallback: str = "error"):
    """`jax.jit` with in/out shardings from the logical rules; donates the old state.

    Tracing happens under `sharding.use_rules(mesh, rules)` so activation constraints apply;
    `fallback` (config `sharding_fallback`) is what an axis the mesh cannot divide does.
    Returns (jitted fn, state shardings, batch shardings).
    """
    state_sh = sharding.state_shardings(state_abstract, mesh, rules, fallback)
    batch_sh = batch_shardings(batch_abstract, mesh, rules)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step_under_rules(state, batch):
        with sharding.use_rules(mesh, rules, fallback):
            return train_step(state, batch)

    fn = jax.jit(step_under_rules, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, replicated), donate_argnums=(0,))
    return fn, state_sh, batch_sh
