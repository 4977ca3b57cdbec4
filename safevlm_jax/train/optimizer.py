"""AdamW with linear warm-up + cosine decay; which parameters train is a list of path regexes.

Parameters are split *before* the optimizer sees them (`split_trainable`): frozen parameters
never enter optax, so they get no optimizer state at all (not even zero-sized masked leaves).
A parameter's path is its nnx state path joined with '/', e.g.
`language_model/model/layers/self_attn/q_proj/lora/lora_a` (scanned layers have no index).
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from safevlm_jax.checkpoint.io import path_str


def trainable_filter(patterns: Sequence[str]):
    """An nnx filter: Params whose path matches one of `patterns` (re.search)."""
    regexes = [re.compile(p) for p in patterns]

    def is_trainable(path, value) -> bool:
        return isinstance(value, nnx.Param) and any(r.search(path_str(path)) for r in regexes)

    return is_trainable


def split_trainable(model: nnx.Module, patterns: Sequence[str], frozen_dtype: str | None = None):
    """model -> (graphdef, trainable State, frozen State).

    `frozen` holds every other variable (frozen params, RNG streams). Frozen floating-point
    params are cast to `frozen_dtype` (e.g. bfloat16: only trained weights need f32 masters).
    Raises if no parameter matches, since a typo would otherwise train nothing.
    """
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(patterns), ...)
    if not jax.tree.leaves(trainable):
        names = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))][:8]
        raise ValueError(f"config.trainable {list(patterns)} matches no parameter; "
                         f"paths look like {names}")
    if frozen_dtype:
        dt = jnp.dtype(frozen_dtype)

        def cast(v):
            x = v.get_value()
            if isinstance(v, nnx.Param) and jnp.issubdtype(x.dtype, jnp.floating):
                return v.replace(x.astype(dt))
            return v

        frozen = jax.tree.map(cast, frozen, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return graphdef, trainable, frozen


def learning_rate_schedule(lr: float, warmup_steps: int, total_steps: int,
                           end_lr_fraction: float = 0.0) -> optax.Schedule:
    """0 -> lr linearly over `warmup_steps`, then cosine to `end_lr_fraction * lr` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=lr * end_lr_fraction)


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ global-norm clipping when `cfg.max_grad_norm > 0`) from `config.optimizer`."""
    schedule = learning_rate_schedule(cfg.lr, cfg.warmup_steps, total_steps, cfg.end_lr_fraction)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    chain = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    return optax.chain(*chain, adamw), schedule
