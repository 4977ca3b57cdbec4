"""Train state: the pure pytrees the jitted step consumes, and their shardings.

    TrainState(step  int32 [],
               trainable  nnx.State (f32 master weights; the only optimised leaves),
               frozen     nnx.State (everything else: frozen params, RNG stream variables),
               opt_state  optax state over `trainable` only,
               rng        uint32 key data [2] (the run's root key; step keys are folded in))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from safevlm_jax.train.optimizer import split_trainable


class TrainState(NamedTuple):
    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array


def create_state(model: nnx.Module, cfg, optimizer: optax.GradientTransformation):
    """(graphdef, TrainState) from a built model and the training config (`trainable`,
    `frozen_dtype`, `seed`). Works on an abstract model (`nnx.eval_shape`) too."""
    graphdef, trainable, frozen = split_trainable(model, cfg.trainable, cfg.frozen_dtype)
    opt_state = optimizer.init(trainable)
    rng = jax.random.key_data(jax.random.key(cfg.seed + 1))
    return graphdef, TrainState(jnp.zeros((), jnp.int32), trainable, frozen, opt_state, rng)


def abstract_state(make_model, cfg, optimizer):
    """(graphdef, TrainState of ShapeDtypeStructs) without allocating any parameter."""
    holder = {}

    def build():
        holder["graphdef"], state = create_state(make_model(), cfg, optimizer)
        return state

    state = jax.eval_shape(build)
    return holder["graphdef"], state


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying shardings (inputs for `.lower`)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
