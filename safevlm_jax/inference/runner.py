"""The device side of generation: a model's parameters (on a mesh, or one device), the decode
state they run on, and the programs of `programs` at shapes rounded up to buckets.

    runner = Runner(model, max_length=2048, eos_id=2, pad_id=0, mesh=mesh)
    runner.reset(rows=8, length=2048)                  # the decode state
    features, level, kind = runner.encode(pixels, query_ids, verdict=True)
    prefix = runner.new_prefix(rows=1, length=runner.prefix_length(n))
    tokens, prefix = runner.prefill(prefix, [chunk_ids], [image_offset], features, sampling, True)
    runner.insert(prefix, tokens, rows=[3], sampling=sampling, limits=[64])
    tokens, done, logprobs = runner.step(rows=4, length=256)   # [4] next tokens of rows 0..3
    out = runner.decode(max_steps=64)                   # each row's tokens until it is done
    tokens, timings = runner.generate(prompts, features, sampling, max_new=64, use_safety=True)

The caller keeps to the runner's thread (the state is donated at every call) and to
`max_length`: a prompt and its answer fit one row.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from safevlm_jax import sharding
from safevlm_jax.inference import programs
from safevlm_jax.inference.buckets import (BATCH_BUCKETS, DECODE_LENGTH_BUCKETS, NEW_TOKEN_BUCKETS, PROMPT_BUCKETS,
                                           bucket, capped, pad_rows)
from safevlm_jax.inference.logits import RowLogits
from safevlm_jax.inference.requests import SamplingParams
from safevlm_jax.inference.sampling import RowSampling
from safevlm_jax.inference.state import DecodeState, cache_dtype, empty_cache, new_state, place
from safevlm_jax.models.kv_cache import KVCache

CHUNK_BUCKETS = (16, 64, 256, 1024, 4096, 16384)  # tokens per prefill call (few: few programs)


class Runner:
    """model: a SafeVLM (its dropout is switched off); max_length: the context (prompt +
    answer); mesh/rules: where the parameters and the decode state live
    (`sharding.RULE_SETS`), None: the model's device. `reset(rows, length)` makes the decode
    state. Every shape a program sees is a bucket; batches of images and the rows of a
    decode step are multiples of the mesh's `data` axis."""

    def __init__(self, model, *, max_length: int, eos_id: int, pad_id: int, mesh: Mesh | None = None,
                 rules: str = "inference"):
        model.eval()  # dropout (e.g. LoRA's) off: sampling is deterministic given its seed
        self.config, self.mesh, self.rules = model.config, mesh, rules
        self.graphdef, params = nnx.split(model)
        self.params = jax.device_put(params, sharding.state_shardings(params, mesh, rules)) if mesh else params
        leaves = jax.tree.leaves(self.params)
        devices = leaves[0].sharding.device_set if leaves and hasattr(leaves[0], "sharding") else set()
        self.device = next(iter(devices)) if mesh is None and len(devices) == 1 else None
        self.eos_id, self.pad_id, self.max_length = eos_id, pad_id, max_length
        self.data = mesh.shape["data"] if mesh is not None else 1
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b % self.data == 0)
        self.state: DecodeState | None = None
        self._kw = dict(mesh=mesh, rules=rules)

    @property
    def corners_pay(self) -> bool:
        """Whether a decode step over a corner of the state beats one over all of it. Not on
        XLA:CPU: there the step fuses its cache write with the corner's read and copies every
        layer's whole K and V buffers twice to keep the old ones for it (a 1-row step of the
        ~350M model took 2.5x the time of an 8-row step over the whole state)."""
        return self.platform != "cpu"

    @property
    def split_from(self) -> int:
        """The narrowest prefill chunk worth a call of its own: on an accelerator a narrower one
        costs about one read of the weights (memory-bound), so padding it costs less than
        another call; on CPU a chunk costs about its width from a few tokens on."""
        return CHUNK_BUCKETS[0] if self.platform == "cpu" else 256

    @property
    def platform(self) -> str:
        leaf = jax.tree.leaves(self.params)[0]
        return next(iter(leaf.sharding.device_set)).platform

    @property
    def rows(self) -> int:
        return self.state.rows

    @property
    def length(self) -> int:
        """The decode state's cache slots per row."""
        return self.state.cache.max_len

    def reset(self, rows: int, length: int) -> None:
        """A decode state of `rows` free rows of `length` slots (the last one's buffers when
        it has that shape)."""
        if self.state is not None and (self.rows, self.length) == (rows, length):
            return self.release(np.arange(rows))
        self.state = None  # its memory first
        self.state = new_state(self.config, rows, length, self.mesh, self.rules, self.device)
        self.row_buckets = capped(tuple(b for b in self.batch_buckets if b < rows), rows)
        self.length_buckets = capped(DECODE_LENGTH_BUCKETS, length)

    # Images -----------------------------------------------------------------------------
    def encode(self, pixels: np.ndarray, query_ids: Sequence[int], verdict: bool):
        """pixels [B, H, W, 3] f32, query_ids [B] -> (CLIP features, one [1, N, C] device
        array per image; level logits [B, 4] and type logits [B, 7] as numpy, or None without
        `verdict`), in batches of at most the largest bucket."""
        step, features, level, kind = self.batch_buckets[-1], [], [], []
        for start in range(0, len(pixels), step):
            part = np.asarray(pixels[start:start + step], np.float32)
            padded = bucket(len(part), self.batch_buckets, "images")
            rows, lv, kd = programs.verdict_program(
                self.graphdef, self.params, pad_rows(part, padded),
                pad_rows(np.asarray(query_ids[start:start + step], np.int32), padded), verdict=verdict, **self._kw)
            features += rows[:len(part)]
            level.append(None if lv is None else np.asarray(lv)[:len(part)])
            kind.append(None if kd is None else np.asarray(kd)[:len(part)])
        return features, *(np.concatenate(a) if verdict else None for a in (level, kind))

    # Prompts ----------------------------------------------------------------------------
    def prefix_length(self, tokens: int) -> int:
        """The slots of a prefix cache for a prompt of `tokens` (a decode length bucket)."""
        return bucket(tokens, self.length_buckets, "prompt length")

    def new_prefix(self, rows: int, length: int) -> KVCache:
        """An empty prefix cache: `rows` prompts of up to `length` tokens."""
        return place(empty_cache(self.config, rows, length, self.mesh is None), self.mesh,
                     sharding.without(self.rules, programs.ROWS), self.device)

    def reuse(self, prefix: KVCache, keep: int, length: int) -> KVCache:
        """A new one-row prefix of `length` slots holding the first `keep` tokens of `prefix`."""
        return programs.reuse_program(prefix, np.array([keep], np.int32), length=length, **self._kw)

    def prefill(self, prefix: KVCache, chunks: Sequence[Sequence[int]], image_offsets: Sequence[int],
                features, sampling: RowSampling, use_safety: bool,
                width: int | None = None) -> tuple[np.ndarray, KVCache]:
        """The next tokens of each prompt (chunks: ids [n], at each row's index; padded to
        `width`, default a bucket, at most the prefix's slots) into `prefix` (donated);
        image_offsets: image positions of each prompt before its chunk; features: each
        prompt's [1, N, C] (`encode`; None: text only). Returns (the token sampled after each
        chunk [n], prefix)."""
        n, longest = len(chunks), max(len(c) for c in chunks)
        width = width or min(bucket(longest, CHUNK_BUCKETS, "chunk"), prefix.max_len)
        ids = np.full((prefix.batch, width), self.pad_id, np.int32)
        lengths = np.zeros(prefix.batch, np.int32)
        for i, chunk in enumerate(chunks):
            ids[i, :len(chunk)], lengths[i] = chunk, len(chunk)
        c = self.config  # image positions per prompt: the CLIP features (+ the safety tokens)
        per_image = c.num_image_features + (c.safety.num_tokens if use_safety and c.safety.enabled else 0)
        first = np.zeros(prefix.batch, np.int32)
        first[:n] = np.arange(n) * per_image + np.asarray(image_offsets, np.int32)
        if features is not None:
            features = tuple(features) + (features[0],) * (prefix.batch - n)
        tokens, prefix = programs.prefill_program(self.graphdef, self.params, prefix, ids, lengths, first, features,
                                                  _pad(sampling, prefix.batch), use_safety=use_safety, **self._kw)
        return np.asarray(tokens)[:n], prefix

    def insert(self, prefix: KVCache, tokens: Sequence[int], rows: Sequence[int], sampling: RowSampling,
               limits: Sequence[int], row_logits: RowLogits | None = None, first: bool = True,
               keep: Sequence[int] | None = None) -> None:
        """The prompts of `prefix` (one per row of `rows`; each its first `keep` slots, default
        all it holds) into those rows, with their first tokens, sampling rules and max tokens;
        `first=False`: tokens are the prompts' last tokens, which `prefix` does not hold
        (`programs.insert_program`)."""
        n = len(rows)
        row_logits = RowLogits.plain(n) if row_logits is None else row_logits
        keep = np.asarray(prefix.index if keep is None else keep, np.int32)
        self.state = programs.insert_program(prefix, keep, np.asarray(tokens, np.int32), self.state,
                                             np.asarray(rows, np.int32), sampling, row_logits,
                                             np.asarray(limits, np.int32), np.full(n, int(first), np.int32),
                                             np.int32(self.eos_id), **self._kw)

    # Decoding ---------------------------------------------------------------------------
    def step(self, rows: int, length: int, bitmask: np.ndarray | None = None):
        """One decode step over rows 0..rows-1 and cache slots 0..length-1 (buckets), with a
        grammar mask `bitmask` [rows, ceil(V / 32)] int32 or None: their next tokens [rows]
        int32, done flags [rows] bool (EOS or max tokens reached) and log-probabilities
        (`logits.logprobs`, device arrays: read them only when a row asked)."""
        self.state, tokens, done, logprobs = programs.step_program(
            self.graphdef, self.params, self.state, np.int32(self.eos_id), bitmask, rows=rows, length=length,
            **self._kw)
        return np.asarray(tokens), np.asarray(done), logprobs

    def decode(self, max_steps: int) -> list[np.ndarray]:
        """Decode steps until every row is done or `max_steps` ran: each row's new tokens."""
        self.state, out = programs.generate_program(self.graphdef, self.params, self.state, np.int32(self.eos_id),
                                                    np.int32(self.pad_id), max_steps=max_steps, **self._kw)
        made = np.asarray(self.state.steps) - 1  # the first token came from the prefill
        return [row[:n] for row, n in zip(np.asarray(out), made)]

    def generate(self, prompts: Sequence[Sequence[int]], features, sampling: Sequence[SamplingParams], max_new: int,
                 use_safety: bool, on_step: Callable[[int, int, bool], None] | None = None):
        """A whole batch: every prompt prefilled (one call), inserted into its row of a fresh
        decode state, then the decode loop (`decode`), or, with `on_step(row, token, last)`
        for each token as it comes, the step looped from Python. prompts fit `max_length`
        with `max_new` tokens; features: each prompt's [1, N, C]. Returns (each prompt's
        tokens, {prefill_s, decode_s, tokens_per_s})."""
        n, longest = len(prompts), max(len(p) for p in prompts)
        rows = bucket(n, self.batch_buckets, "batch")
        width = bucket(longest, capped(PROMPT_BUCKETS, self.max_length), "prompt length")
        steps = bucket(max_new, NEW_TOKEN_BUCKETS, "max_new_tokens")
        self.reset(rows, width + steps)
        rule = RowSampling.of(list(sampling) + [sampling[0]] * (rows - n))
        start = time.perf_counter()
        padded = list(prompts) + [prompts[0]] * (rows - n)  # real rows: no all-padding attention
        first, prefix = self.prefill(self.new_prefix(rows, width), padded, [0] * rows, features, rule, use_safety,
                                     width)
        prefill_s = time.perf_counter() - start
        self.insert(prefix, first, np.arange(rows), rule, [max_new] * rows)
        del prefix
        if on_step is None:
            out = [[int(t), *row.tolist()] for t, row in zip(first[:n], self.decode(steps)[:n])]
        else:
            out = self._stream(first[:n], on_step)
        decode_s = time.perf_counter() - start - prefill_s
        made = sum(len(o) - 1 for o in out)
        return out, {"prefill_s": prefill_s, "decode_s": decode_s,
                     "tokens_per_s": made / decode_s if decode_s > 0 and made else 0.0}

    def _stream(self, first: np.ndarray, on_step: Callable[[int, int, bool], None]) -> list[list[int]]:
        """The jitted step looped from Python (gemma's `_stream_sample_loop`), until the state
        says each row is done (EOS or its max tokens)."""
        n = len(first)
        out, done = [[int(t)] for t in first], np.asarray(self.state.done[:n])
        for row, token in enumerate(first):
            on_step(row, int(token), bool(done[row]))
        while not done.all():
            tokens, now, _ = self.step(self.rows, self.length)
            for row in np.flatnonzero(~done):
                out[row].append(int(tokens[row]))
                on_step(int(row), int(tokens[row]), bool(now[row]))
            done = now[:n]
        return out

    def release(self, rows: Sequence[int]) -> None:
        """Rows done: they stop decoding."""
        self.state = programs.release_program(self.state, np.asarray(rows, np.int32), **self._kw)

    def take(self, row: int, length: int) -> KVCache:
        """Row `row` of the decode state and its first `length` slots, as a one-row prefix."""
        return programs.take_program(self.state.cache, np.array([row], np.int32), length=length, **self._kw)

    def cache_bytes(self, rows: int, length: int) -> int:
        """Bytes of the keys and values of `rows` rows of `length` slots."""
        t = self.config.text
        return (2 * t.num_hidden_layers * rows * t.num_key_value_heads * length * t.head_dim
                * jnp.dtype(cache_dtype(self.config)).itemsize)


def _pad(sampling: RowSampling, rows: int) -> RowSampling:
    return RowSampling(*(pad_rows(np.asarray(a), rows) for a in
                         (sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed)))
