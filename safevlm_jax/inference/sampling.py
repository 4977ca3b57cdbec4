"""Sampling on the device: one family for every caller, a rule per row.

    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=1).check(vocab_size)
    rows = RowSampling.of([params, SamplingParams()])      # [B] arrays, one row each
    tokens = sample(logits, rows, steps)                     # logits [B, V] -> ids [B]

Temperature 0 is greedy; otherwise the logits are divided by the temperature, then top-k (0 =
off) and top-p (1 = off) keep their sets, both together if given (as vLLM and HF apply them),
and a token is drawn. Row b draws with the key fold_in(key(seed_b), step_b), step = tokens the
row has sampled so far: a request samples the same tokens whatever row it sits in and whoever
sits beside it. Every number is a traced array, so one compiled program serves any mix.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safevlm_jax.inference.requests import SamplingParams

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """A rule per row, all [B] arrays: temperature f32, top_k int32, top_p f32, seed uint32."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> "RowSampling":
        """Checked `SamplingParams`, one per row, as numpy arrays."""
        return cls(np.array([p.temperature for p in params], np.float32),
                   np.array([p.top_k for p in params], np.int32),
                   np.array([p.top_p for p in params], np.float32),
                   np.array([p.seed % 2**32 for p in params], np.uint32))

    @classmethod
    def greedy(cls, rows: int) -> "RowSampling":
        return cls.of([SamplingParams()] * rows)

    def logical_axes(self) -> "RowSampling":
        return RowSampling(*(("cache_batch",),) * 4)


def sample(logits: jax.Array, rows: RowSampling, steps: jax.Array) -> jax.Array:
    """logits [B, V] f32, rows [B], steps [B] int32 (tokens each row sampled so far) -> ids
    [B] int32. Sorting the vocabulary and drawing run only when some row needs them."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = rows.temperature > 0
    filtered = sampled & ((rows.top_k > 0) | (rows.top_p < 1))

    def draw(logits):
        keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(rows.seed, steps)
        logits = logits / jnp.where(sampled, rows.temperature, 1.0)[:, None]
        logits = jax.lax.cond(jnp.any(filtered), lambda x: _top_k_top_p(x, rows), lambda x: x, logits)
        return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(sampled), draw, lambda _: greedy, logits)
    return jnp.where(sampled, drawn, greedy)


def _top_k_top_p(logits: jax.Array, rows: RowSampling) -> jax.Array:
    """logits [B, V] with -inf outside each row's top-k set (ties with the k-th stay, as in
    HF), then outside the smallest set whose probability reaches top_p (always >= 1 token)."""
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.clip(rows.top_k, 1, logits.shape[-1])[:, None]
    kth = jnp.take_along_axis(ordered, k - 1, axis=-1)
    off = rows.top_k[:, None] <= 0
    logits = jnp.where(off | (logits >= kth), logits, -jnp.inf)
    ordered = jnp.where(off | (ordered >= kth), ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    p = rows.top_p[:, None]
    threshold = jnp.min(jnp.where(before < p, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((p >= 1) | (logits >= threshold), logits, -jnp.inf)
