"""LoRA (Hu et al. 2021) as peft lays it out, kept in its own `lora` parameter subtree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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
                                    out_sharding=(in_axis, None), eager_sharding=False)
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), param_dtype),
                                    out_sharding=(None, out_axis), eager_sharding=False)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        if self.dropout is not None:
            x = self.dropout(x)
        h = jnp.dot(x, self.lora_a[...].astype(dtype))
        return jnp.dot(h, self.lora_b[...].astype(dtype)) * jnp.asarray(self.scaling, dtype)
