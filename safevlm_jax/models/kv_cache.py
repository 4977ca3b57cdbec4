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

The write index is one number for the whole batch (`generate`: every row advances together),
or one per row (continuous batching: each row holds its own request, written from slot 0,
and `insert` puts a newly prefilled request into one row while the others keep theirs).
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
    index: [] or [batch] int32, the next slot to write, shared or per row (slots are written
    in order, so slot order is causal order)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
             dtype=jnp.float32, per_row: bool = False) -> "KVCache":
        """Empty buffers; `per_row`: an index per row ([batch]) instead of one shared ([])."""
        def buffers():  # k and v each get their own, donated and written in place
            return tuple(jnp.zeros((batch * kv_heads, max_len, head_dim), dtype) for _ in range(num_layers))

        return cls(k=buffers(), v=buffers(), mask=jnp.zeros((batch, max_len), jnp.bool_),
                   index=jnp.zeros((batch,) if per_row else (), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    def write_mask(self, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """valid [B, T] bool of T tokens about to be written at each row's index ->
        (the cache mask with them [B, S], attention mask [B, T, S]: query j of row b sees
        the real slots up to its own, index_b + j)."""
        b, t = valid.shape
        index = jnp.broadcast_to(self.index, (b,))
        slot_valid = _write(self.mask, valid, self.index)
        upto = jnp.arange(self.max_len)[None, None, :] <= (index[:, None] + jnp.arange(t)[None, :])[..., None]
        return slot_valid, slot_valid[:, None, :] & upto

    def insert(self, prefilled: "KVCache", row: jax.Array, slot: jax.Array,
               index: jax.Array) -> "KVCache":
        """This per-row cache (index [batch]) with row `slot` replaced by row `row` of
        `prefilled` (same layers and heads, T <= max_len slots): its keys, values and mask at
        slots 0..T-1, nothing real after them, next write at `index` (for a right-padded
        prompt of L tokens: L, so decode overwrites the padding). In place when donated."""
        kvh = self.k[0].shape[0] // self.mask.shape[0]
        zero = jnp.zeros((), jnp.int32)

        def put(buf, src):
            part = jax.lax.dynamic_slice_in_dim(src, row * kvh, kvh, axis=0)
            return jax.lax.dynamic_update_slice(buf, part.astype(buf.dtype), (slot * kvh, zero, zero))

        mask = jnp.zeros((self.max_len,), jnp.bool_).at[:prefilled.max_len].set(prefilled.mask[row])
        return KVCache(k=tuple(map(put, self.k, prefilled.k)), v=tuple(map(put, self.v, prefilled.v)),
                       mask=self.mask.at[slot].set(mask), index=self.index.at[slot].set(index))


def _write(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """buf [R, S, ...] with new [R, T, ...] written at slot `index`: [] for every row, or
    [R / n] for each group of n consecutive rows (n = kv heads: rows are batch x kv head)."""
    new = new.astype(buf.dtype)
    zero = jnp.zeros((), jnp.int32)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(buf, new, (zero, index) + (zero,) * (buf.ndim - 2))
    index = jnp.repeat(index, buf.shape[0] // index.shape[0], total_repeat_length=buf.shape[0])
    return jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice(b, n, (i,) + (zero,) * (b.ndim - 1)))(
        buf, new, index)


def update(cached: tuple[jax.Array, jax.Array, jax.Array], k: jax.Array,
           v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's buffers `cached` = (k, v [B * KVH, S, Dh], index [] or [B]) with the new
    k, v [B * KVH, T, Dh] written at slots index..index+T-1 (each row's own index when given
    per row); in place when the buffers are a loop carry or donated, since the write is
    their last use."""
    return tuple(_write(buf, new, cached[2]) for buf, new in zip(cached[:2], (k, v)))
