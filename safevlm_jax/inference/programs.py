"""The device programs of generation (MaxText's MaxEngine API), plain jitted functions:

    features, level, kind = verdict_program(graphdef, params, pixels, query_ids, verdict=True)
    tokens, prefix = prefill_program(graphdef, params, prefix, ids, lengths, first, features,
                                     sampling, use_safety=True)        # one chunk of prompts
    state = insert_program(prefix, keep, tokens, state, rows, sampling, row_logits, limits, steps, eos_id)
    state, tokens, done, logprobs = step_program(graphdef, params, state, eos_id, bitmask, rows=8, length=512)
    state, out = generate_program(graphdef, params, state, eos_id, pad_id, max_steps=64)

A whole batch (`SafeVLMInference.answer`) is "prefill every prompt, insert every row, then
`generate_program`" (a `lax.while_loop` of the step); streaming and the serving engine loop
`step_program` from Python (gemma's `_stream_sample_loop`). Both run `decode`, the one step.

`prefill_program` runs T tokens of each prompt at the cache's index, right-padded (`lengths`:
the real ones), so a prompt goes in one call or in chunks, after a reused prefix or not;
`first` is each row's flat index into `features` of its chunk's first image position. It
samples a token after each row's last real token (the first answer token, for the last chunk).

Every program takes `mesh` and `rules` (static): inside, activations and the cache are
constrained by their logical axes (`sharding.use_rules`), so given arrays placed on the mesh
(`state.place`, `checkpoint.format.load_checkpoint(..., mesh)`) each program runs sharded.
`plan` lowers them for a target mesh the same way. Decode programs on one device take the CPU
matrix-vector kernel (`models.layers.decode_mode`); a sharded program keeps XLA's dots (the
kernel's custom call has no partitioning rule). The state and prefixes are donated and
written in place.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from safevlm_jax import sharding
from safevlm_jax.inference.logits import RowLogits, apply_mask, logprobs, penalize
from safevlm_jax.inference.sampling import RowSampling, sample
from safevlm_jax.inference.state import DecodeState
from safevlm_jax.models.kv_cache import KVCache
from safevlm_jax.models.layers import decode_mode

STATIC = ("graphdef", "mesh", "rules")


def _merge(graphdef, params, mesh: Mesh | None, decoding: bool = False):
    model = nnx.merge(graphdef, params)
    return decode_mode(model) if decoding and (mesh is None or mesh.size == 1) else model


ROWS = ("batch", "cache_batch")  # the logical axes of rows: a prefix's stay whole (a prompt or a few)


def _rules(mesh: Mesh | None, rules: str, rows: bool = True):
    """Constraints for `mesh` under `rules` (none without a mesh); `rows=False`: the rows of a
    prefix are replicated, not split over `data` (prefill runs one prompt, or a few)."""
    if mesh is None:
        return contextlib.nullcontext()
    return sharding.use_rules(mesh, rules if rows else sharding.without(rules, ROWS))


@functools.partial(jax.jit, static_argnames=(*STATIC, "verdict"))
def verdict_program(graphdef, params, pixel_values, query_ids, *, verdict: bool, mesh: Mesh | None = None,
                    rules: str = "inference"):
    """(graphdef, params) of a `SafetyVerdict` (SafeVLM or the guard's VerdictModel);
    pixel_values [B, H, W, 3] f32, query_ids [B] int32 (the head's query token,
    `safety.prompt.query_id`) -> (CLIP features, one [1, N, C] array per image (each kept
    alone for its request's prefill), and with `verdict` the safety head's level [B, 4] and
    type [B, 7] logits, else None). No LLM layer runs."""
    with _rules(mesh, rules):
        model = nnx.merge(graphdef, params)
        features = model.image_features(pixel_values)
        rows = tuple(features[i:i + 1] for i in range(features.shape[0]))
        if not verdict:
            return rows, None, None
        level, kind = model.verdict_logits(features, query_ids[:, None], jnp.ones((query_ids.shape[0], 1), jnp.int32))
        return rows, level, kind


@functools.partial(jax.jit, static_argnames=(*STATIC, "use_safety"), donate_argnames=("prefix",))
def prefill_program(graphdef, params, prefix: KVCache, ids, lengths, first, features, sampling: RowSampling, *,
                    use_safety: bool, mesh: Mesh | None = None, rules: str = "inference"):
    """prefix: a cache of n rows (each row's index: its tokens so far); ids [n, T] int32,
    right-padded, each `<image>` expanded; lengths [n]: real tokens; features: each row's
    CLIP features [1, N, C] (`verdict_program`), or None (text only); first [n]: the flat
    index into the rows' image embeddings of each chunk's first image position; sampling
    [n]. Returns (the token sampled after each row's last real token [n], prefix)."""
    with _rules(mesh, rules, rows=False):
        model = _merge(graphdef, params, mesh)
        t = ids.shape[1]
        mask = jnp.arange(t)[None] < lengths[:, None]
        positions = prefix.index[:, None] + jnp.arange(t)[None]
        features = None if features is None else jnp.concatenate(features)
        embeds = model.input_embeddings(ids, features, use_safety, first)
        logits, prefix = model.language_model(embeds, positions, mask, prefix, logits_at=lengths - 1)
        return sample(logits[:, 0], sampling, jnp.zeros_like(lengths)), prefix.constrain()


@functools.partial(jax.jit, static_argnames=("mesh", "rules"), donate_argnames=("state",))
def insert_program(prefix: KVCache, keep, tokens, state: DecodeState, rows, sampling: RowSampling,
                   row_logits: RowLogits, limits, steps, eos_id, *, mesh: Mesh | None = None,
                   rules: str = "inference") -> DecodeState:
    """Prefilled prompts into rows `rows` [n] of the state: prefix (n rows, T <= the state's
    slots), of which each row keeps its first keep [n] slots (its index, or fewer of a cached
    prefix); sampling and row_logits [n], limits [n] their max tokens; steps [n]: 1 when tokens
    [n] are their first answer tokens, 0 when they are their prompts' last tokens, which the
    prefix does not hold (the next decode step reads it and samples the first answer token:
    a grammar's mask applies to it, and one prefix goes into several rows, each with its own
    first token)."""
    with _rules(mesh, rules):
        put = lambda a, b: a.at[rows].set(b)
        first = (steps > 0) & (tokens == eos_id)
        return DecodeState(cache=state.cache.put(prefix, rows, keep),
                           tokens=put(state.tokens, tokens), steps=put(state.steps, steps),
                           limit=put(state.limit, limits), done=put(state.done, first | (steps >= limits)),
                           sampling=jax.tree.map(put, state.sampling, sampling),
                           row_logits=jax.tree.map(put, state.row_logits, row_logits),
                           history=put(state.history, jnp.zeros((len(rows), state.history.shape[1]), jnp.int32)
                                       .at[:, 0].set(jnp.where(steps > 0, tokens, 0)))).constrain()


def decode(model, state: DecodeState, eos_id, bitmask=None) -> tuple[DecodeState, jax.Array, tuple]:
    """The one decode step: each row not done feeds its last token at its own position and
    samples the next ([B]; a done row repeats its last) after its penalties and, with
    `bitmask` [B, ceil(V / 32)], its grammar's mask (`logits`). A row is done after EOS or
    `limit`. Returns (state, tokens, `logits.logprobs` of the model's logits)."""
    lm = model.language_model
    active = ~state.done
    logits, cache = lm(lm.embed(state.tokens[:, None]), state.cache.index[:, None], active[:, None], state.cache)
    raw = logits[:, 0]
    shaped = apply_mask(penalize(raw, state.row_logits, state.history, state.steps), bitmask)
    tokens = jnp.where(active, sample(shaped, state.sampling, state.steps), state.tokens)
    rows = jnp.arange(state.rows)
    history = state.history.at[rows, jnp.where(active, state.steps, state.history.shape[1])].set(tokens, mode="drop")
    steps = state.steps + active
    done = state.done | (tokens == eos_id) | (steps >= state.limit)
    return (state.replace(cache=cache, tokens=tokens, steps=steps, done=done, history=history), tokens,
            logprobs(raw, tokens, state.row_logits))


@functools.partial(jax.jit, static_argnames=(*STATIC, "rows", "length"), donate_argnames=("state",))
def step_program(graphdef, params, state: DecodeState, eos_id, bitmask=None, *, rows: int, length: int,
                 mesh: Mesh | None = None, rules: str = "inference"):
    """`decode` over rows 0..rows-1 and cache slots 0..length-1 (every busy row lies there),
    with a grammar mask `bitmask` [rows, ceil(V / 32)] int32 or None (a variant of its own):
    (the state, those rows' tokens [rows], done flags [rows] and `logits.logprobs`)."""
    with _rules(mesh, rules):
        model = _merge(graphdef, params, mesh, decoding=True)
        new, tokens, lp = decode(model, state.view(rows, length), eos_id, bitmask)
        return state.merge_view(new).constrain(), tokens, new.done, lp


@functools.partial(jax.jit, static_argnames=(*STATIC, "max_steps"), donate_argnames=("state",))
def generate_program(graphdef, params, state: DecodeState, eos_id, pad_id, *, max_steps: int,
                     mesh: Mesh | None = None, rules: str = "inference") -> tuple[DecodeState, jax.Array]:
    """`decode` in a `lax.while_loop` until every row is done or `max_steps` steps ran:
    (state, tokens [B, max_steps] int32: each step's token per row, pad_id once done)."""
    with _rules(mesh, rules):
        model = _merge(graphdef, params, mesh, decoding=True)
        out = jnp.full((state.rows, max_steps), pad_id, jnp.int32)

        def body(carry):
            i, state, out = carry
            was_done = state.done
            state, tokens, _ = decode(model, state, eos_id)
            out = jax.lax.dynamic_update_slice(out, jnp.where(was_done, pad_id, tokens)[:, None], (0, i))
            return i + 1, state.constrain(), out

        _, state, out = jax.lax.while_loop(lambda c: (c[0] < max_steps) & ~jnp.all(c[1].done), body,
                                           (jnp.int32(0), state, out))
        return state, out


@functools.partial(jax.jit, static_argnames=("mesh", "rules"), donate_argnames=("state",))
def release_program(state: DecodeState, rows, *, mesh: Mesh | None = None, rules: str = "inference") -> DecodeState:
    """Rows `rows` [n] done: they stop decoding (cancelled, stopped on the host, or free)."""
    with _rules(mesh, rules):
        return state.replace(done=state.done.at[rows].set(True)).constrain()


@functools.partial(jax.jit, static_argnames=("length", "mesh", "rules"))
def take_program(cache: KVCache, rows, *, length: int, mesh: Mesh | None = None,
                 rules: str = "inference") -> KVCache:
    """Rows `rows` [n] of a cache and their first `length` slots, as a prefix to reuse."""
    with _rules(mesh, rules, rows=False):
        return cache.take(rows, length).constrain()


@functools.partial(jax.jit, static_argnames=("length", "mesh", "rules"))
def reuse_program(prefix: KVCache, keep, *, length: int, mesh: Mesh | None = None,
                  rules: str = "inference") -> KVCache:
    """A fresh cache of `length` slots holding the first `keep` [n] slots of `prefix` (n
    rows): a cached prefix to prefill the rest of a longer prompt after."""
    with _rules(mesh, rules, rows=False):
        n, buf = prefix.batch, prefix.k[0]
        fresh = KVCache.init(len(prefix.k), n, buf.shape[0] // n if prefix.merged else buf.shape[1], length,
                             buf.shape[-1], buf.dtype, prefix.merged)
        return fresh.put(prefix.take(jnp.arange(n), min(length, prefix.max_len)), jnp.arange(n), keep).constrain()
