"""Parameter creation: logical-axis annotation and the initialisers the reference uses."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = Sequence[str | None]


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """An `nnx.Param` annotated with logical axis names (no eager sharding: the mesh is
    applied at the jit boundary)."""
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def normal_init(rngs: nnx.Rngs, shape, dtype, stddev: float = 0.02) -> jax.Array:
    return (stddev * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def fan_in_init(rngs: nnx.Rngs, shape, dtype, fan_in: int) -> jax.Array:
    """torch.nn.Linear's default (kaiming-uniform, a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound).astype(dtype)
