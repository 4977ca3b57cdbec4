"""Fixed-size key/value cache for decoding: one buffer per layer, a write index per row.

Each layer's keys and values are `[batch, kv_heads, max_len, head_dim]`: one head's keys are
contiguous over the sequence and the attention products take (batch, kv head) as their batch
axes, so they read the cache where it lies (XLA:CPU copied a `[batch, seq, kv_heads, ...]`
cache by transposing it, and a stacked `[layers, ...]` one by slicing it). The axes carry
logical names (`AXES`), so a mesh shards the cache with the rules of `sharding.py` like the
weights: kv heads over `tensor`, rows over `data`. On one device the cache can be `merged`:
`[batch * kv_heads, max_len, head_dim]`, one batch axis. XLA:CPU turns a product with two
batch axes into one with a merged axis, and the reshape between the decode loop's carry and
the product made it write every buffer twice and copy it three times at each step (20% of
the ~350M decode); a merged buffer is the product's operand as it is.

Each row holds one sequence from slot 0 on, with its own write index: a row's position is its
index, rows advance by their real tokens only (a write's real tokens come first, right-padded;
a padding or idle row keeps its index), and
rows are copied between caches of other sizes (`take`, `put`): a prompt prefilled in a cache
of its own is put into a row of the decode cache, and a row taken back out is a prefix to
reuse. Each layer writes its new entries (`lax.dynamic_update_slice`) before attending over
its buffer, so the write is the old buffer's last use and happens in place under `jit` when
the cache is donated or is a loop carry.

A decode step need not read every row and slot: `view(rows, length)` keeps the whole buffers
but the mask and index of the first `rows` rows and `length` slots only. A layer writes its
new entries into the whole buffers, in place, and attends over just that corner (on XLA:CPU a
copy of it, as a dot takes no strided operand: worth it only when the corner is small);
`merge_view` takes the step's mask and index back.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from safevlm_jax import sharding

AXES = ("cache_batch", "cache_kv", "cache_length", None)  # of each k and v buffer
MERGED_AXES = (None, "cache_length", None)  # a merged buffer's (one device: nothing to split)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v: one [batch, kv_heads, max_len, head_dim] array per layer (compute dtype), or
    [batch * kv_heads, max_len, head_dim] when merged; mask: [batch, max_len] bool, True where
    a slot holds a real token; index: [batch] int32, each row's next slot to write (slots are
    written in order: slot order is causal order)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
             dtype=jnp.float32, merged: bool = False) -> "KVCache":
        shape = (batch * kv_heads,) if merged else (batch, kv_heads)

        def buffers():  # k and v each get their own, donated and written in place
            return tuple(jnp.zeros((*shape, max_len, head_dim), dtype) for _ in range(num_layers))

        return cls(k=buffers(), v=buffers(), mask=jnp.zeros((batch, max_len), jnp.bool_),
                   index=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        """The slots the cache's rows read (a view: fewer than its buffers hold)."""
        return self.mask.shape[1]

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def merged(self) -> bool:
        return self.k[0].ndim == 3

    def logical_axes(self) -> "KVCache":
        """The logical axis names of every array (a KVCache of tuples), for `sharding.py`."""
        axes = MERGED_AXES if self.merged else AXES
        return KVCache(k=(axes,) * len(self.k), v=(axes,) * len(self.v),
                       mask=("cache_batch", "cache_length"), index=("cache_batch",))

    def constrain(self) -> "KVCache":
        """Every array constrained to its logical axes (identity outside `sharding.use_rules`)."""
        return jax.tree.map(sharding.constrain, self, self.logical_axes())

    def view(self, rows: int, length: int) -> "KVCache":
        """Rows 0..rows-1 and slots 0..length-1, for a step whose busy rows all lie there (an
        idle row's index may lie past `length`: its write is dropped or clamped onto its own
        slots, which hold nothing real). The buffers stay whole: no copy."""
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
        t = valid.shape[1]
        slot_valid = _write(self.mask[:, None, :, None], valid[:, None, :, None], self.index)[:, 0, :, 0]
        upto = jnp.arange(self.max_len)[None, None, :] <= (self.index[:, None] + jnp.arange(t))[..., None]
        return slot_valid, slot_valid[:, None, :] & upto

    def take(self, rows: jax.Array, length: int) -> "KVCache":
        """Rows `rows` [n] and their first `length` slots (<= max_len) as a cache of their own,
        indices kept: a row to reuse as a prefix."""
        take = lambda b: _merge(_split(b, self.batch)[rows, :, :length], self.merged)
        return KVCache(k=tuple(map(take, self.k)), v=tuple(map(take, self.v)),
                       mask=self.mask[rows, :length], index=self.index[rows])

    def put(self, src: "KVCache", rows: jax.Array, keep: jax.Array) -> "KVCache":
        """This cache with rows `rows` [n] replaced by the rows of `src` (same layers and heads,
        T <= max_len slots), of which the first `keep` [n] slots are kept: mask False from
        there, next write at `keep` (for a prompt of L tokens: L; decode overwrites the rest).
        In place when donated."""
        t = src.max_len
        put = lambda buf, new: _merge(_split(buf, self.batch).at[rows, :, :t].set(
            _split(new, src.batch).astype(buf.dtype)), self.merged)
        mask = (jnp.arange(self.max_len)[None] < keep[:, None]) & jnp.pad(src.mask, ((0, 0), (0, self.max_len - t)))
        return KVCache(k=tuple(map(put, self.k, src.k)), v=tuple(map(put, self.v, src.v)),
                       mask=self.mask.at[rows].set(mask), index=self.index.at[rows].set(keep))


def _split(buf: jax.Array, batch: int) -> jax.Array:
    """A buffer as [batch, kv_heads, slots, head_dim] (a merged one reshaped)."""
    return buf if buf.ndim == 4 else buf.reshape(batch, -1, *buf.shape[1:])


def _merge(buf: jax.Array, merged: bool) -> jax.Array:
    return buf.reshape(-1, *buf.shape[2:]) if merged else buf


def _constrain(buf: jax.Array) -> jax.Array:
    return sharding.constrain(buf, MERGED_AXES if buf.ndim == 3 else AXES)


def _write(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """buf [R, H, S, ...] (or merged [R * H, S, ...]) with new [R', H, T, ...] written at slots
    index[r].. of each row r (index [R'], R' <= R: a view writes into its first rows). One
    token per row (decode): a `dynamic_update_slice` per row (clamped: only an idle row's
    index can lie past S), which writes in place; a vmapped one became a scatter that read the
    old entries first, and XLA copied every buffer at every step to keep them. Several tokens
    (a prompt, right-padded) are scattered, writes past S dropped (a clamped write would move
    real tokens)."""
    new = new.astype(buf.dtype)
    rows, heads, t = new.shape[:3]
    if t > 1:
        slots = index[:, None] + jnp.arange(t)
        four = buf.reshape(-1, heads, *buf.shape[1:]) if buf.ndim == 3 else buf
        four = four.at[jnp.arange(rows)[:, None], :, slots].set(jnp.moveaxis(new, 2, 1), mode="drop")
        return four.reshape(buf.shape)
    zero = jnp.zeros((), jnp.int32)
    for r in range(rows):
        at = (jnp.int32(r * heads), index[r]) if buf.ndim == 3 else (jnp.int32(r), zero, index[r])
        buf = jax.lax.dynamic_update_slice(buf, new[r] if buf.ndim == 3 else new[r:r + 1],
                                           at + (zero,) * (new.ndim - 3))
    return buf


def update(cached: tuple[jax.Array, jax.Array, jax.Array], k: jax.Array,
           v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's buffers `cached` = (k, v [B', KVH, S', Dh] or merged, index [B]) with the
    new k, v [B, KVH, T, Dh] written at each row's slots index..index+T-1; in place when the
    buffers are a loop carry or donated, since the write is their last use."""
    return tuple(_constrain(_write(buf, new, cached[2])) for buf, new in zip(cached[:2], (k, v)))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention over a layer's cache buffers, f32 scores: q [B, KVH, G, T, Dh]
    (scaled), k, v [B', KVH, S', Dh] or merged [B' * KVH, S', Dh] (B' >= B rows, S' >= S
    slots: the first B rows and S slots are read), mask [B, 1, 1, T, S] bool. Returns
    [B, KVH, G, T, Dh]. Unmerged, (batch, kv head) are the products' two batch axes, so a
    buffer sharded over either is read where it lies."""
    b, kvh, g, t, dh = q.shape
    s = mask.shape[-1]
    dt = jnp.promote_types(q.dtype, k.dtype)  # a cache wider than the compute dtype sets it
    lead = (b * kvh,) if k.ndim == 3 else (b, kvh)
    k, v = (x[:b * kvh, :s] if x.ndim == 3 else x[:b, :, :s] for x in (k, v))
    batch = "n" if k.ndim == 3 else "bk"
    scores = jnp.einsum(f"{batch}md,{batch}sd->{batch}ms", q.astype(dt).reshape(*lead, g * t, dh), k.astype(dt),
                        preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores.reshape(b, kvh, g, t, s), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt).reshape(*lead, g * t, s)
    return jnp.einsum(f"{batch}ms,{batch}sd->{batch}md", probs, v.astype(dt)).reshape(b, kvh, g, t, dh)
