"""Fixed-size key/value cache for decoding (one buffer per layer, updated in place).

Each layer's keys and values are `[batch, kv_heads, max_len, head_dim]`: one head's keys are
contiguous over the sequence, so attention reads them as a plain batched matmul operand (with
`[batch, seq, kv_heads, head_dim]` XLA:CPU transposed the whole cache in every layer at every
step), and one buffer per layer lets the matmul read it where it lies (slicing one stacked
`[layers, ...]` buffer made XLA:CPU copy every layer's slice at every step). New entries are
written with `lax.dynamic_update_slice`, in place under `jit` when the cache is donated or is
a loop carry.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v: one [batch, kv_heads, max_len, head_dim] array per layer (compute dtype);
    mask: [batch, max_len] bool, True where a slot holds a real (non-padding) token;
    index: [] int32, the next slot to write (slots are written in order, so slot order is
    causal order)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
             dtype=jnp.float32) -> "KVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
        return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   mask=jnp.zeros((batch, max_len), jnp.bool_), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def write(cache: KVCache, kv: list[tuple[jax.Array, jax.Array]], valid: jax.Array) -> KVCache:
    """The cache with each layer's (k, v) [B, KVH, T, Dh] and valid [B, T] written at slot
    `index` (after the layer loop, so attention never reads a buffer being written); `index`
    advances by T. The caller keeps index + T <= max_len."""
    zero = jnp.zeros((), jnp.int32)
    at = (zero, zero, cache.index, zero)
    put = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), at)
    return KVCache(k=tuple(put(b, k) for b, (k, _) in zip(cache.k, kv)),
                   v=tuple(put(b, v) for b, (_, v) in zip(cache.v, kv)),
                   mask=jax.lax.dynamic_update_slice(cache.mask, valid, (zero, cache.index)),
                   index=cache.index + kv[0][0].shape[2])
