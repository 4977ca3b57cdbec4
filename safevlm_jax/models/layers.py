"""Building blocks shared by every model: annotated parameters, Dense (+LoRA), norms, activations.

Every parameter carries logical axis names in its `out_sharding` metadata (mapped to a mesh
only by `safevlm_jax.sharding`). Kernels are stored [in, out] (HF stores [out, in]; the
converters transpose). Compute runs in `dtype`, parameters are kept in `param_dtype`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from safevlm_jax.models import dot as dots
from safevlm_jax.models.lora import LoRA
from safevlm_jax.models.params import fan_in_init, normal_init, param

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Dense(nnx.Module):
    """y = x @ kernel [+ bias] [+ LoRA(x)]; kernel [in, out] with logical axes `axes`."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
                 use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
                 init_std: float | None = None, lora_rank: int = 0, lora_alpha: float = 16.0,
                 lora_dropout: float = 0.0, rngs: nnx.Rngs):
        self.dtype = dtype
        if init_std is None:
            w = fan_in_init(rngs, (in_features, out_features), param_dtype, in_features)
        else:
            w = normal_init(rngs, (in_features, out_features), param_dtype, init_std)
        self.kernel = param(w, axes)
        self.bias = (param(jnp.zeros((out_features,), param_dtype), (axes[1],))
                     if use_bias else None)
        self.lora = (LoRA(in_features, out_features, lora_rank, lora_alpha, lora_dropout,
                          axes[0], axes[1], param_dtype=param_dtype, rngs=rngs)
                     if lora_rank > 0 else None)
        # True in a decode program's copy of the model (`decode_mode`): products of a few rows
        # may then take the CPU matrix-vector kernel (`models.dot.dot`)
        self.decode_kernel = False

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., in] -> [..., out] in `dtype`.

        The dots run on x flattened to [tokens, in]: the weight gradients then contract one
        axis, which XLA:CPU does in place; contracting [batch, length] made it transpose the
        output gradient of every trainable layer first (docs/performance.md).
        """
        lead = x.shape[:-1]
        x = x.astype(self.dtype).reshape(-1, x.shape[-1])
        y = dots.dot(x, self.kernel[...], self.dtype, self.decode_kernel)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x, self.dtype)
        return y.reshape(*lead, y.shape[-1])


class Embed(nnx.Module):
    """Token embedding table [vocab, embed]; `attend` gives tied output logits."""

    def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(normal_init(rngs, (num_embeddings, features), param_dtype),
                               ("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        """[...] int -> [..., embed]."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """[..., embed] -> [..., vocab] logits against the table (tied LM head)."""
        return dots.xla_dot(x.astype(self.dtype), self.embedding[...], self.dtype, w_axis=1)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm, computed in f32 as HF does, cast back to the input dtype then scaled."""

    def __init__(self, features: int, eps: float, *, param_dtype=jnp.float32, axis: str = "embed"):
        self.eps = eps
        self.scale = param(jnp.ones((features,), param_dtype), (axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * h.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (f32 statistics), with scale and bias."""

    def __init__(self, features: int, eps: float, *, param_dtype=jnp.float32, axis: str = "embed"):
        self.eps = eps
        self.scale = param(jnp.ones((features,), param_dtype), (axis,))
        self.bias = param(jnp.zeros((features,), param_dtype), (axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def decode_mode(module: nnx.Module) -> nnx.Module:
    """`module` with every Dense set to take the CPU decode kernel for few-row products, in
    place; returns it. Decode programs call it on their own merged copy of the model, so the
    choice is explicit in the program that makes it (prefill in the same program keeps XLA's
    dots on its own copy)."""
    module.set_attributes(Dense, decode_kernel=True)
    return module
