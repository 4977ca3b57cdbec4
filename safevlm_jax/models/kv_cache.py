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

A decode step of continuous batching need not read every row and slot: `view(rows, length)`
keeps the whole buffers but the mask and index of the first `rows` rows and `length` slots
only. A layer writes its new entries into the whole buffers, in place, and attends over just
that corner (on XLA:CPU a copy of it, as a dot takes no strided operand: worth it only when the
corner is small); `merge_view` takes the step's mask and index back.
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
        """The slots the cache's rows read (a view: fewer than its buffers hold)."""
        return self.mask.shape[1]

    def view(self, rows: int, length: int) -> "KVCache":
        """Rows 0..rows-1 and slots 0..length-1 of this per-row cache, for a step whose busy
        rows all lie there (an idle row's index may lie past `length`: its write lands past
        its end, or clamped onto its last viewed slot, and a free row is garbage until its
        next `insert` anyway). The buffers stay whole: no copy."""
        return dataclasses.replace(self, mask=self.mask[:rows, :length], index=self.index[:rows])

    def merge_view(self, view: "KVCache") -> "KVCache":
        """This cache after a step on its `view(...)`: the step's buffers, mask and index."""
        rows, length = view.mask.shape
        return KVCache(k=view.k, v=view.v, mask=self.mask.at[:rows, :length].set(view.mask),
                       index=self.index.at[:rows].set(view.index))

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
    """buf [R, S, ...] with new [R', T, ...] written at slot `index`: [] for every row, or
    [R' / n] for each group of n consecutive rows (n = kv heads: rows are batch x kv head);
    R' < R (per-row index only): into the first R' rows."""
    new = new.astype(buf.dtype)
    zero = jnp.zeros((), jnp.int32)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(buf, new, (zero, index) + (zero,) * (buf.ndim - 2))
    rows = new.shape[0]
    index = jnp.repeat(index, rows // index.shape[0], total_repeat_length=rows)
    if rows < buf.shape[0]:  # a view's first rows: scattered into the whole buffer, in place
        slots = index[:, None] + jnp.arange(new.shape[1])
        return buf.at[jnp.arange(rows)[:, None], slots].set(new, mode="drop")
    return jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice(b, n, (i,) + (zero,) * (b.ndim - 1)))(
        buf, new, index)


def update(cached: tuple[jax.Array, jax.Array, jax.Array], k: jax.Array,
           v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's buffers `cached` = (k, v [B * KVH, S, Dh], index [] or [B]) with the new
    k, v [B * KVH, T, Dh] written at slots index..index+T-1 (each row's own index when given
    per row); in place when the buffers are a loop carry or donated, since the write is
    their last use."""
    return tuple(_write(buf, new, cached[2]) for buf, new in zip(cached[:2], (k, v)))
