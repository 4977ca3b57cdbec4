"""What a decode step does to a row's logits besides sampling (`sampling`), each row its own:
OpenAI's presence and frequency penalties over the answer so far, a grammar's token mask
(constrained decoding, `constraints`), and the log-probabilities it reports.

    rows = RowLogits.of([params, ...])                        # [B] arrays
    logits = penalize(logits, rows, history, steps)           # [B, V]
    logits = apply_mask(logits, bitmask)                      # bitmask [B, ceil(V / 32)] int32
    chosen, top_ids, top_logprobs = logprobs(raw, tokens, rows)

Penalties as OpenAI defines them: mu[j] - c[j] * frequency - (c[j] > 0) * presence, c[j] the
times token j was generated so far. Log-probabilities are the model's own (log-softmax of the
logits before penalties, mask and temperature, vLLM's default); `TOP_LOGPROBS` per row, the
caller keeps as many as asked. Each piece runs only when some row needs it (`lax.cond`), and
every value is a traced array: one compiled step serves any mix.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

TOP_LOGPROBS = 20  # OpenAI's most top_logprobs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowLogits:
    """Per row [B]: presence and frequency penalties f32 (0: off), logprobs bool (report them)."""

    presence: jax.Array
    frequency: jax.Array
    logprobs: jax.Array

    @classmethod
    def of(cls, params: Sequence) -> "RowLogits":
        """From checked `SamplingParams`, one per row, as numpy arrays."""
        return cls(np.array([p.presence_penalty for p in params], np.float32),
                   np.array([p.frequency_penalty for p in params], np.float32),
                   np.array([p.logprobs for p in params], np.bool_))

    @classmethod
    def plain(cls, rows: int) -> "RowLogits":
        return cls(np.zeros(rows, np.float32), np.zeros(rows, np.float32), np.zeros(rows, np.bool_))

    def logical_axes(self) -> "RowLogits":
        return RowLogits(*(("cache_batch",),) * 3)


def penalize(logits: jax.Array, rows: RowLogits, history: jax.Array, steps: jax.Array) -> jax.Array:
    """logits [B, V] f32; history [B, L] int32: each row's answer tokens, the first `steps` [B]
    of them real -> logits with each row's penalties."""
    def apply(logits):
        b, length = history.shape
        real = (jnp.arange(length)[None] < steps[:, None]).astype(logits.dtype)
        counts = jnp.zeros_like(logits).at[jnp.arange(b)[:, None], history].add(real)
        return logits - rows.frequency[:, None] * counts - rows.presence[:, None] * (counts > 0)

    used = jnp.any((rows.presence != 0) | (rows.frequency != 0))
    return jax.lax.cond(used, apply, lambda x: x, logits)


def apply_mask(logits: jax.Array, bitmask: jax.Array | None) -> jax.Array:
    """logits [B, V]; bitmask [B, ceil(V / 32)] int32, bit j of word w allows token 32 w + j
    (llguidance's layout; all ones: unconstrained) -> -inf where not allowed."""
    if bitmask is None:
        return logits
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :logits.shape[-1]].astype(jnp.bool_)
    return jnp.where(allowed, logits, -jnp.inf)


def logprobs(logits: jax.Array, tokens: jax.Array, rows: RowLogits):
    """The model's logits [B, V] and the chosen tokens [B] -> (their log-probabilities [B],
    the top `TOP_LOGPROBS` ids [B, k] int32 and log-probabilities [B, k]); zeros when no row
    asks for them."""
    b, k = logits.shape[0], min(TOP_LOGPROBS, logits.shape[-1])

    def compute(logits):
        lp = jax.nn.log_softmax(logits, axis=-1)
        top, ids = jax.lax.top_k(lp, k)
        return jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0], ids.astype(jnp.int32), top

    def skip(logits):
        return jnp.zeros(b, logits.dtype), jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), logits.dtype)

    return jax.lax.cond(jnp.any(rows.logprobs), compute, skip, logits)
