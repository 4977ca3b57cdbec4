"""Fixed-size key/value cache for decoding (one buffer for all layers, updated in place).

Layout `[layers, batch, kv_heads, max_len, head_dim]`: a layer's keys for one head are
contiguous over the sequence, so attention reads them as a plain batched matmul operand
(with `[batch, seq, kv_heads, head_dim]` XLA:CPU transposed the whole cache in every layer at
every step). New entries are written with `lax.dynamic_update_slice`, which is in place under
`jit` when the cache is donated or is a loop carry.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v: [layers, batch, kv_heads, max_len, head_dim] (compute dtype);
    mask: [batch, max_len] bool, True where a slot holds a real (non-padding) token;
    index: [] int32, the next slot to write (slots are written in order, so slot order is
    causal order)."""

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
             dtype=jnp.float32) -> "KVCache":
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   mask=jnp.zeros((batch, max_len), jnp.bool_), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def write(cache: KVCache, k: jax.Array, v: jax.Array, valid: jax.Array) -> KVCache:
    """The cache with k, v [layers, B, KVH, T, Dh] and valid [B, T] written at slot `index`
    (all layers at once, after the layer loop, so attention never reads a buffer being
    written); `index` advances by T. The caller keeps index + T <= max_len."""
    zero = jnp.zeros((), jnp.int32)
    at = (zero, zero, zero, cache.index, zero)
    return KVCache(k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at),
                   v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at),
                   mask=jax.lax.dynamic_update_slice(cache.mask, valid, (zero, cache.index)),
                   index=cache.index + k.shape[3])
