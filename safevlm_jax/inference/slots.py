"""The two jitted programs of continuous batching: requests in the rows ("slots") of one KV cache.

    cache = new_cache(config, slots, max_len, per_row=True)     # inference.decode
    token, cache = prefill(graphdef, state, cache, ids, length, features, slot, rule, seed, step,
                           use_safety=True)
    tokens, cache = decode_step(graphdef, state, cache, tokens, active, rule, seeds, steps,
                                rows=rows, length=length)

Each row holds one request from cache slot 0 on, with its own write index (the KV cache's
per-row mode), so a row's position is its index. `prefill` runs one prompt, right-padded to a
length bucket, in a cache of its own and inserts that into its row of the shared cache (the
other rows are untouched), sampling the first token from the logits of the last real token.
`decode_step` feeds each of the first `rows` rows its last token at its own position; idle
rows are masked and keep their index. It reads only those rows and the first `length` slots of
the cache (`KVCache.view`): the engine keeps busy requests in the lowest free rows and picks
both from a few buckets, so one request alone does not pay for eight rows of `max_len` slots.
Sampling is `PerRow`, and each row draws with key fold_in(key(seed), step), step = tokens it
has sampled so far: a request samples the same tokens whatever slot it sits in and whoever
sits beside it. The shared cache is donated and written in place by both programs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from safevlm_jax.inference.sampling import PerRow
from safevlm_jax.models.layers import decode_mode
from safevlm_jax.models.kv_cache import KVCache
from safevlm_jax.models.safevlm import default_positions


def row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """seeds [B] uint32, steps [B] int32 -> one PRNG key per row."""
    return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, steps)


@functools.partial(jax.jit, static_argnames=("graphdef", "use_safety"), donate_argnames=("cache",))
def prefill(graphdef, state, cache: KVCache, input_ids, length, features, slot, rule: PerRow,
            seed, step, *, use_safety: bool):
    """One request into row `slot` of `cache` (per-row index; donated).

    input_ids [1, T] int32, right-padded (T <= cache.max_len); length [] int32, its real
    tokens; features [1, N, C] CLIP features or None (text only); rule: `PerRow` of one row;
    seed [1] uint32; step [1] int32 (0: the first token). Returns (token [] int32, cache).
    """
    model = nnx.merge(graphdef, state)
    t = input_ids.shape[1]
    mask = (jnp.arange(t) < length)[None].astype(jnp.int32)
    own = KVCache.init(len(cache.k), 1, cache.k[0].shape[0] // cache.mask.shape[0], t,
                       cache.k[0].shape[2], cache.k[0].dtype)
    embeds = model.input_embeddings(input_ids, features, use_safety)
    logits, own = model.language_model(embeds, default_positions(mask), mask, own,
                                       logits_at=(length - 1)[None])
    token = rule(logits[:, 0], row_keys(seed, step))[0]
    return token, cache.insert(own, jnp.int32(0), slot, length)


@functools.partial(jax.jit, static_argnames=("graphdef", "rows", "length"), donate_argnames=("cache",))
def decode_step(graphdef, state, cache: KVCache, tokens, active, rule: PerRow, seeds, steps, *,
                rows: int, length: int):
    """Rows 0..rows-1 one token further: tokens [R] int32 (each row's last), active [R] bool,
    rule `PerRow` [R], seeds [R] uint32, steps [R] int32, R = rows; every busy row is among
    them and its index below `length`. Returns (next tokens [R], cache)."""
    lm = decode_mode(nnx.merge(graphdef, state)).language_model  # the CPU kernel, as the decode loop
    view = cache.view(rows, length)
    logits, new = lm(lm.embed(tokens[:, None]), view.index[:, None], active[:, None].astype(jnp.int32), view)
    new = dataclasses.replace(new, index=jnp.where(active, new.index, view.index))
    return rule(logits[:, 0], row_keys(seeds, steps)), cache.merge_view(new)
