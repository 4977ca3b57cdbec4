"""SafeVLM loss (docs/safety_modules.md): L = L_LM + λ · (CE(level) + CE(type)), λ = 10.

Losses are returned as *sums* with their counts, so that a batch split into microbatches is
normalised by the whole batch's counts and gives exactly the one-big-batch loss.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100
LOSS_CHUNK = 512  # positions per chunk of the train step's LM loss (`chunked_lm_nll_sum`)


class LossSums(NamedTuple):
    """Per-(micro)batch sums; each field a f32 scalar."""

    lm_nll: jax.Array  # summed token NLL over predicted (unmasked) labels
    level_ce: jax.Array  # summed CE of the risk-level head over rows
    type_ce: jax.Array
    level_correct: jax.Array  # rows whose argmax level is right
    type_correct: jax.Array


def num_target_tokens(labels: jax.Array) -> jax.Array:
    """Tokens that are predicted: labels[:, 1:] != -100 (the causal shift), as a f32 scalar."""
    return jnp.sum(labels[:, 1:] != IGNORE_INDEX).astype(jnp.float32)


def _masked_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Summed NLL of targets [..] (IGNORE_INDEX = none) under logits [.., V], in f32."""
    mask = targets != IGNORE_INDEX
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(mask, targets, 0))
    return jnp.sum(jnp.where(mask, nll, 0.0))


def _targets(labels: jax.Array) -> jax.Array:
    """The token each position predicts: labels shifted left, IGNORE_INDEX at the end. The
    labels are shifted, not the logits: slicing [B, T - 1, V] copied the largest activation of
    the step (and padded its gradient back)."""
    return jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE_INDEX)


def lm_nll_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits [B, T, V] (position t predicts token t+1), labels [B, T] with -100 = ignore."""
    return _masked_nll(logits, _targets(labels))


def chunked_lm_nll_sum(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], labels: jax.Array,
                       chunk: int = LOSS_CHUNK) -> jax.Array:
    """`lm_nll_sum(head(hidden), labels)` without [B, T, V] logits: hidden [B, T, d] (the LLM's
    final normed states), `head` [B, t, d] -> [B, t, V] logits. The positions go `chunk` at a
    time through a scan whose body is rematerialized, so one chunk's f32 logits (and their
    gradient) live at a time: at 7B, batch 8 x 2048 per chip, 2 GiB of f32 logits and 1 GiB of
    their bf16 copy become a quarter of one."""
    b, t, d = hidden.shape
    chunk = min(chunk, t)
    n = -(-t // chunk)
    targets = jnp.pad(_targets(labels), ((0, 0), (0, n * chunk - t)), constant_values=IGNORE_INDEX)
    hidden = jnp.pad(hidden, ((0, 0), (0, n * chunk - t), (0, 0)))
    xs = (hidden.reshape(b, n, chunk, d).swapaxes(0, 1), targets.reshape(b, n, chunk).swapaxes(0, 1))

    @jax.checkpoint
    def one(h, y):
        return _masked_nll(head(h), y)

    total, _ = jax.lax.scan(lambda acc, x: (acc + one(*x), None), jnp.zeros((), jnp.float32), xs)
    return total


def loss_sums(logits, level_logits, type_logits, labels, safe_level, safe_type, head=None) -> LossSums:
    """All sums for one (micro)batch: logits [B, T, V] (or, given `head`, the final hidden
    states [B, T, d] it turns into logits a chunk at a time: `chunked_lm_nll_sum`), level [B, 4],
    type [B, 7], targets [B]."""
    lm = lm_nll_sum(logits, labels) if head is None else chunked_lm_nll_sum(logits, head, labels)
    if level_logits is None:  # a model without safety modules (plain LLaVA): no head terms
        zero = jnp.zeros((), jnp.float32)
        return LossSums(lm, zero, zero, zero, zero)
    level_ce = optax.softmax_cross_entropy_with_integer_labels(level_logits.astype(jnp.float32), safe_level)
    type_ce = optax.softmax_cross_entropy_with_integer_labels(type_logits.astype(jnp.float32), safe_type)
    return LossSums(
        lm_nll=lm,
        level_ce=jnp.sum(level_ce),
        type_ce=jnp.sum(type_ce),
        level_correct=jnp.sum(jnp.argmax(level_logits, -1) == safe_level).astype(jnp.float32),
        type_correct=jnp.sum(jnp.argmax(type_logits, -1) == safe_type).astype(jnp.float32),
    )


def total_loss(sums: LossSums, num_tokens: jax.Array, num_rows: jax.Array | int,
               head_weight: float) -> jax.Array:
    """L_LM (mean over all target tokens) + λ · (mean CE level + mean CE type)."""
    lm = sums.lm_nll / jnp.maximum(num_tokens, 1.0)
    return lm + head_weight * (sums.level_ce + sums.type_ce) / num_rows


def loss_metrics(sums: LossSums, num_tokens: jax.Array, num_rows: int, head_weight: float) -> dict:
    """Scalars for logging from whole-batch sums."""
    lm = sums.lm_nll / jnp.maximum(num_tokens, 1.0)
    return {
        "loss": total_loss(sums, num_tokens, num_rows, head_weight),
        "lm_loss": lm,
        "level_loss": sums.level_ce / num_rows,
        "type_loss": sums.type_ce / num_rows,
        "level_accuracy": sums.level_correct / num_rows,
        "type_accuracy": sums.type_correct / num_rows,
        "target_tokens": num_tokens,
    }
