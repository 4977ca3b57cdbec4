"""LoRA (Hu et al. 2021) as peft lays it out, kept in its own `lora` parameter subtree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from safevlm_jax.models.dot import xla_dot
from safevlm_jax.models.params import fan_in_init


class LoRA(nnx.Module):
    """Low-rank update `dropout(x) @ lora_a @ lora_b * alpha / rank` (peft's `Linear` layout).

    `lora_a` [in, rank] is initialised like peft (kaiming-uniform), `lora_b` [rank, out] to
    zeros, so a fresh adapter leaves the layer unchanged. Both are `nnx.LoRAParam`, a Param
    subtype, so they can be split from the base weights by type or by path (`.../lora/...`).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 dropout: float, in_axis: str | None, out_axis: str | None, *,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.scaling = alpha / rank
        self.lora_a = nnx.LoRAParam(fan_in_init(rngs, (in_features, rank), param_dtype, in_features),
                                    out_sharding=(in_axis, "lora_rank"), eager_sharding=False)
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), param_dtype),
                                    out_sharding=("lora_rank", out_axis), eager_sharding=False)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.merged = False  # set by `merge_lora(..., keep_lora=True)`: the kernel holds it

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        if self.merged:
            return jnp.zeros((), dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        h = xla_dot(x, self.lora_a[...], dtype)
        return xla_dot(h, self.lora_b[...], dtype) * jnp.asarray(self.scaling, dtype)


def lora_state(model: nnx.Module) -> tuple[nnx.State, nnx.State]:
    """(LoRA params, everything else) of `model`, split by type `nnx.LoRAParam`."""
    return nnx.state(model, nnx.LoRAParam, ...)


def _adapters(model: nnx.Module):
    """(owner, LoRA) for every layer with an adapter: owners hold `kernel` and `lora`."""
    return [(m, m.lora) for _, m in nnx.iter_modules(model) if isinstance(getattr(m, "lora", None), LoRA)]


def fold(kernel, lora_a, lora_b, scaling: float, sign: float = 1.0):
    """kernel [..., in, out] + sign * lora_a [..., in, r] @ lora_b [..., r, out] * scaling,
    computed in f32 and returned in the kernel's dtype: the one LoRA merge (modules, states
    and the HF export all use it, so each gives the same bits)."""
    update = jnp.matmul(jnp.asarray(lora_a, jnp.float32), jnp.asarray(lora_b, jnp.float32)) * scaling
    return (jnp.asarray(kernel, jnp.float32) + sign * update).astype(kernel.dtype)


def merge_lora(model: nnx.Module, *, keep_lora: bool = False) -> nnx.Module:
    """Folds every adapter into its base kernel, in place; returns `model`.

    keep_lora=False drops the adapters (no LoRA params remain: for export and inference).
    keep_lora=True keeps them, marked merged (their forward is skipped), so that
    `unmerge_lora` can subtract them back, as peft's `merge_adapter`/`unmerge_adapter`.
    """
    for owner, lora in _adapters(model):
        if not lora.merged:
            owner.kernel[...] = fold(owner.kernel[...], lora.lora_a[...], lora.lora_b[...], lora.scaling)
        if keep_lora:
            lora.merged = True
        else:
            owner.lora = None
    return model


def unmerge_lora(model: nnx.Module) -> nnx.Module:
    """Inverse of `merge_lora(model, keep_lora=True)`, in place; returns `model`."""
    for owner, lora in _adapters(model):
        if lora.merged:
            owner.kernel[...] = fold(owner.kernel[...], lora.lora_a[...], lora.lora_b[...], lora.scaling, -1.0)
            lora.merged = False
    return model


def merge_lora_state(state: nnx.State, scaling: float) -> nnx.State:
    """Pure version on a state (e.g. a checkpoint): every `<layer>/kernel` gets
    `lora/lora_a @ lora/lora_b * scaling` of the same layer added; the LoRA leaves are dropped."""
    flat = dict(nnx.to_flat_state(state))
    out = []
    for path, var in flat.items():
        if path[-1] in ("lora_a", "lora_b"):
            continue
        a = flat.get(path[:-1] + ("lora", "lora_a")) if path[-1] == "kernel" else None
        if a is not None:
            b = flat[path[:-1] + ("lora", "lora_b")]
            var = var.replace(fold(var.get_value(), a.get_value(), b.get_value(), scaling))
        out.append((path, var))
    return nnx.from_flat_state(out)
