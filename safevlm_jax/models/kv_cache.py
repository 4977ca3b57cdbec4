"""Fixed-size key/value cache for decoding (one buffer per layer, updated in place).

Each layer's keys and values are `[batch * kv_heads, max_len, head_dim]`, batch and kv head
merged: one head's keys are contiguous over the sequence and the attention products have a
single batch axis, so they read the cache where it lies. Each of these choices removed a
copy of the whole cache per layer and decode step on XLA:CPU: `[batch, seq, kv_heads, ...]`
was transposed; one stacked `[layers, ...]` buffer was sliced; separate batch and head axes
were reshaped, which made XLA duplicate the cache write. Each layer writes its new entries
(`lax.dynamic_update_slice`) before attending over its whole buffer, so the write is the
old buffer's last use and happens in place under `jit` when the cache is donated or is a
loop carry (reading first, then writing, also cost a copy per buffer and step).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v: one [batch * kv_heads, max_len, head_dim] array per layer (compute dtype);
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
        def buffers():  # k and v each get their own, donated and written in place
            return tuple(jnp.zeros((batch * kv_heads, max_len, head_dim), dtype) for _ in range(num_layers))

        return cls(k=buffers(), v=buffers(), mask=jnp.zeros((batch, max_len), jnp.bool_),
                   index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]


def update(cached: tuple[jax.Array, jax.Array, jax.Array], k: jax.Array,
           v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's buffers `cached` = (k, v [B * KVH, S, Dh], index []) with the new k, v
    [B * KVH, T, Dh] written at slots index..index+T-1; in place when the buffers are a loop
    carry or donated, since the write is their last use."""
    zero = jnp.zeros((), jnp.int32)
    at = (zero, cached[2], zero)
    return tuple(jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), at)
                 for buf, new in zip(cached[:2], (k, v)))
