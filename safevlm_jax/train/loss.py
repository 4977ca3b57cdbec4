"""SafeVLM loss (docs/safety_modules.md): L = L_LM + λ · (CE(level) + CE(type)), λ = 10.

Losses are returned as *sums* with their counts, so that a batch split into microbatches is
normalised by the whole batch's counts and gives exactly the one-big-batch loss.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100


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


def lm_nll_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits [B, T, V] (position t predicts token t+1), labels [B, T] with -100 = ignore.
    The labels are shifted, not the logits: slicing [B, T - 1, V] copied the largest
    activation of the step (and padded its gradient back)."""
    targets = jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE_INDEX)
    mask = targets != IGNORE_INDEX
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(mask, targets, 0))
    return jnp.sum(jnp.where(mask, nll, 0.0))


def loss_sums(logits, level_logits, type_logits, labels, safe_level, safe_type) -> LossSums:
    """All sums for one (micro)batch: logits [B, T, V], level [B, 4], type [B, 7], targets [B]."""
    if level_logits is None:  # a model without safety modules (plain LLaVA): no head terms
        zero = jnp.zeros((), jnp.float32)
        return LossSums(lm_nll_sum(logits, labels), zero, zero, zero, zero)
    level_ce = optax.softmax_cross_entropy_with_integer_labels(level_logits.astype(jnp.float32), safe_level)
    type_ce = optax.softmax_cross_entropy_with_integer_labels(type_logits.astype(jnp.float32), safe_type)
    return LossSums(
        lm_nll=lm_nll_sum(logits, labels),
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
