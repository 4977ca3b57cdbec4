"""Generation: prefill a fixed-size KV cache and decode in one jitted `lax.while_loop`.

    features, level, type = decoder.encode(pixel_values, first_ids)   # CLIP (+ safety head)
    result = decoder.generate(prompts, features, max_new_tokens=64, sampler=TopP(0.9))

`encode` is one small jitted call (the safety verdict needs only the image and each row's
first token, docs/safety_modules.md), so the caller can build the prompt with its hint before the
single prefill+decode program runs. Prompts are left-padded to a length bucket and the batch is
padded (by repeating row 0) to a batch bucket; `max_new_tokens`, temperatures and top-p are
traced values. So a call recompiles only for a new (batch bucket, length bucket, new-token
bucket, sampler kind, safety on/off, per-step callback on/off), and Decoders of equal models
share programs. The cache of each shape is kept and donated back to the program, which
writes it in place.
"""

from __future__ import annotations

import functools
import itertools
import time
import weakref
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safevlm_jax.inference.buckets import BATCH_BUCKETS, NEW_TOKEN_BUCKETS, PROMPT_BUCKETS, bucket, pad_rows
from safevlm_jax.inference.errors import BadRequest
from safevlm_jax.inference.sampling import Greedy
from safevlm_jax.models.kv_cache import KVCache
from safevlm_jax.models.layers import decode_mode
from safevlm_jax.models.safevlm import SafeVLM, default_positions


class Generation(NamedTuple):
    """tokens: one list of generated ids per prompt (up to and including EOS);
    prefill_s: seconds until the first token was sampled (None without a clock);
    total_s: seconds of the whole program."""

    tokens: list[list[int]]
    prefill_s: float | None
    total_s: float


@functools.partial(jax.jit, static_argnames=("graphdef", "use_safety"))
def encode(graphdef, state, pixel_values, first_ids, *, use_safety):
    """pixel_values [B, H, W, 3], first_ids [B] -> (features [B, N, C], level [B, L] | None,
    type [B, K] | None)."""
    model = nnx.merge(graphdef, state)
    features = model.image_features(pixel_values)
    if not (use_safety and model.has_safety):
        return features, None, None
    level, kind = model.verdict_logits(features, first_ids[:, None], jnp.ones((first_ids.shape[0], 1), jnp.int32))
    return features, level, kind


class SamplingState(NamedTuple):
    """The decode loop's carry. step: tokens sampled so far []; token: each row's last [B];
    position: each row's next position [B]; done: rows past EOS [B]; tokens: the output
    [B, new-token bucket], pad after EOS; cache: the KV cache; key: the PRNG key."""

    step: jax.Array
    token: jax.Array
    position: jax.Array
    done: jax.Array
    tokens: jax.Array
    cache: KVCache
    key: jax.Array


_LISTENERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> _Clock
_NEXT_ID = itertools.count()


def _notify(listener: jax.Array, tokens: jax.Array) -> None:
    """Host side of the per-step callback: the listener id is traced, so every Decoder shares
    one compiled program."""
    clock = _LISTENERS.get(int(listener))
    if clock is not None:
        clock(tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "use_safety", "timed"),
                   donate_argnames=("cache",))
def _generate(graphdef, state, input_ids, attention_mask, features, cache, key, max_new_tokens,
              sampler, eos_id, pad_id, listener, *, use_safety, timed):
    """input_ids/attention_mask [B, T] left-padded; features [B, N, C] or None; cache with
    T + new-token-bucket slots; `timed`: call `_notify(listener, tokens)` after each step.
    Returns (tokens [B, bucket] int32, pad after EOS; steps []; cache)."""
    model = nnx.merge(graphdef, state)
    lm = model.language_model
    decoding = decode_mode(nnx.merge(graphdef, state)).language_model  # same weights, decode kernel
    batch, slots = input_ids.shape[0], cache.max_len - input_ids.shape[1]
    cache = KVCache(cache.k, cache.v, jnp.zeros_like(cache.mask), jnp.zeros((), jnp.int32))
    embeds = model.input_embeddings(input_ids, features, use_safety)
    positions = default_positions(attention_mask)
    logits, cache = lm(embeds, positions, attention_mask, cache, last_only=True)
    key, sub = jax.random.split(key)
    token = sampler(logits[:, -1], sub)
    if timed:
        jax.debug.callback(_notify, listener, token, ordered=True)
    out = jnp.full((batch, slots), pad_id, jnp.int32).at[:, 0].set(token)
    start = SamplingState(jnp.int32(1), token, positions[:, -1] + 1, token == eos_id, out, cache, key)

    def cond(s: SamplingState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: SamplingState) -> SamplingState:
        logits, cache = decoding(decoding.embed(s.token[:, None]), s.position[:, None],
                                 jnp.ones((batch, 1), jnp.int32), s.cache)
        key, sub = jax.random.split(s.key)
        token = jnp.where(s.done, pad_id, sampler(logits[:, 0], sub))
        if timed:
            jax.debug.callback(_notify, listener, token, ordered=True)
        out = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
        return SamplingState(s.step + 1, token, s.position + 1, s.done | (token == eos_id), out, cache, key)

    end = jax.lax.while_loop(cond, body, start)
    return end.tokens, end.step, end.cache


class Decoder:
    """Holds a model's (graphdef, state), its token ids and one reusable cache per shape.

    eos_id ends a row; pad_id fills prompts and finished rows. `max_length` (default: the
    model's `max_position_embeddings`) bounds prompt + new tokens.
    """

    def __init__(self, model: SafeVLM, *, eos_id: int, pad_id: int, max_length: int | None = None,
                 prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
                 batch_buckets: Sequence[int] = BATCH_BUCKETS):
        model.eval()  # dropout (e.g. LoRA's) off: sampling is deterministic given its seed
        self.graphdef, self.state = nnx.split(model)
        self.config = model.config
        self.eos_id, self.pad_id = eos_id, pad_id
        self.max_length = max_length or model.config.text.max_position_embeddings
        self.prompt_buckets, self.batch_buckets = tuple(prompt_buckets), tuple(batch_buckets)
        self._caches: dict[tuple[int, int], KVCache] = {}
        self._clock, self._listener = _Clock(), next(_NEXT_ID)
        _LISTENERS[self._listener] = self._clock

    def encode(self, pixel_values: np.ndarray, first_ids: Sequence[int], use_safety: bool = True):
        """pixel_values [B, H, W, 3] f32, first_ids [B] (each prompt's first token, BOS) ->
        (features [B, N, C], level_logits [B, 4] | None, type_logits [B, 7] | None) as numpy."""
        b = len(first_ids)
        pb = bucket(b, self.batch_buckets, "batch")
        pixels = pad_rows(np.asarray(pixel_values, np.float32), pb)
        ids = pad_rows(np.asarray(first_ids, np.int32), pb)
        out = encode(self.graphdef, self.state, pixels, ids, use_safety=use_safety)
        return tuple(None if a is None else np.asarray(a)[:b] for a in out)

    def generate(self, prompts: Sequence[Sequence[int]], features: np.ndarray | None, *,
                 max_new_tokens: int, sampler=Greedy(), seed: int = 0, use_safety: bool = True,
                 on_token: Callable[[np.ndarray], None] | None = None,
                 timed: bool = False) -> Generation:
        """prompts: token ids per row, each `<image>` already expanded to
        `num_image_tokens(use_safety)` image ids; features [B, N, C] from `encode` (one image
        per row) or None. `on_token(tokens [B] int32)` is called after every sampled step
        (finished rows give pad_id). `timed` (implied by `on_token`) measures `prefill_s`."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_length:  # the longest request's own fault
            raise BadRequest(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                             f"the context length {self.max_length}")
        b, t = len(prompts), bucket(longest, self.prompt_buckets, "prompt length")
        pb = bucket(b, self.batch_buckets, "batch")
        slots = t + bucket(max_new_tokens, NEW_TOKEN_BUCKETS, "max_new_tokens")
        ids = np.full((pb, t), self.pad_id, np.int32)
        mask = np.zeros((pb, t), np.int32)
        for i in range(pb):
            p = prompts[i] if i < b else prompts[0]
            ids[i, t - len(p):], mask[i, t - len(p):] = p, 1
        if features is not None:
            features = pad_rows(np.asarray(features), pb)
        cache = self._caches.pop((pb, slots), None) or new_cache(self.config, pb, slots, like=self.state)
        timed = timed or on_token is not None
        self._clock.reset(on_token, b)
        start = time.perf_counter()
        out, steps, cache = _generate(
            self.graphdef, self.state, ids, mask, features, cache, jax.random.key(seed),
            jnp.int32(max_new_tokens), sampler, jnp.int32(self.eos_id), jnp.int32(self.pad_id),
            jnp.int32(self._listener), use_safety=use_safety, timed=timed)
        out, steps = np.asarray(out), int(steps)
        total = time.perf_counter() - start
        self._caches[(pb, slots)] = cache
        first = self._clock.first - start if timed else None
        return Generation([self._cut(row[:steps]) for row in out[:b]], first, total)

    def _cut(self, row: np.ndarray) -> list[int]:
        row = row.tolist()
        return row[:row.index(self.eos_id) + 1] if self.eos_id in row else row


def cache_dtype(config, platform: str):
    """The KV cache's dtype for programs on `platform` ("cpu", "tpu", "cuda", ...): the
    compute dtype, but f32 on CPU: XLA:CPU has no fast bf16 batched dot and converted every
    layer's whole bf16 cache to f32 at every decode step; an f32 cache is read as it lies
    (docs/performance.md). Decided by where the programs run, never by the host that traces
    them (an AOT compile for a TPU on a CPU host gets the TPU's bf16)."""
    return jnp.float32 if platform == "cpu" else config.compute_dtype


def new_cache(config, batch: int, length: int, per_row: bool = False, like=None,
              platform: str | None = None) -> KVCache:
    """An empty cache for a model config, in `cache_dtype` of `platform` (default: that of
    the devices holding `like`, else JAX's default backend).
    `per_row`: a write index per row (continuous batching). `like`: the model's state; on one
    device the cache is committed there, as the cache a program hands back is, so the second
    call of a shape does not compile the program again for a committed argument."""
    t = config.text
    leaves = jax.tree.leaves(like) if like is not None else []
    devices = leaves[0].sharding.device_set if leaves and hasattr(leaves[0], "sharding") else set()
    platform = platform or (next(iter(devices)).platform if devices else jax.default_backend())
    cache = KVCache.init(t.num_hidden_layers, batch, t.num_key_value_heads, length, t.head_dim,
                         cache_dtype(config, platform), per_row=per_row)
    return jax.device_put(cache, next(iter(devices))) if len(devices) == 1 else cache


class _Clock:
    """A Decoder's per-step listener: notes when the first token arrives and forwards each
    step's real rows to the caller's `on_token`."""

    def __init__(self):
        self.first, self.forward, self.rows = None, None, 0

    def reset(self, forward, rows: int) -> None:
        self.first, self.forward, self.rows = None, forward, rows

    def __call__(self, tokens) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        if self.forward is not None:
            self.forward(np.asarray(tokens)[:self.rows])
