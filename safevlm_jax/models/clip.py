"""CLIP vision tower (HF `CLIPVisionModel`), the image encoder of LLaVA-1.5.

Sub-module and parameter names mirror HF (`embeddings.patch_embedding`, `pre_layrnorm`,
`encoder.layers.{i}.self_attn.q_proj`, ...) so a converter is a key table. Differences from
HF, all layout only: images are NHWC `[batch, height, width, channels]`, Linear kernels are
[in, out], the patch kernel is [patch, patch, channels, width].

Hidden-state indexing is HF's: `hidden_states[0]` is the embeddings after `pre_layrnorm`,
`hidden_states[i]` the output of layer i (no `post_layernorm`), negative indices count from
the end. LLaVA takes `hidden_states[-2]`, so only `num_layers - 1` layers are run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from safevlm_jax import sharding
from safevlm_jax.config import SELECT_STRATEGIES, VisionConfig
from safevlm_jax.models import attention
from safevlm_jax.models.dot import xla_dot
from safevlm_jax.models.layers import Dense, LayerNorm, activation
from safevlm_jax.models.params import normal_init, param
from safevlm_jax.models.stack import apply_layers, make_layers

HIDDEN_AXES = ("batch", "length", "embed")


class CLIPPatchEmbedding(nnx.Module):
    """Non-overlapping patch projection: a stride-`patch` conv without bias, done as one
    matmul over flattened patches (exact: each output sees exactly one patch)."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p, c = config.patch_size, config.num_channels
        self.patch_size = p
        self.dtype = dtype
        self.kernel = param(normal_init(rngs, (p, p, c, config.hidden_size), param_dtype),
                            (None, None, None, "embed"))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[batch, height, width, channels] -> [batch, grid_h * grid_w, embed], row-major
        patches (HF's conv output flattened). Pixels past the last whole patch are dropped,
        as the conv does."""
        b, h, w, c = pixel_values.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        x = pixel_values[:, :gh * p, :gw * p].astype(self.dtype)
        x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
        return xla_dot(x, self.kernel[...].reshape(p * p * c, -1), self.dtype)


class CLIPVisionEmbeddings(nnx.Module):
    """CLS token + patch embeddings + learned absolute positions (HF `CLIPVisionEmbeddings`)."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.patch_embedding = CLIPPatchEmbedding(config, dtype=dtype, param_dtype=param_dtype,
                                                  rngs=rngs)
        self.class_embedding = param(normal_init(rngs, (config.hidden_size,), param_dtype),
                                     ("embed",))
        self.position_embedding = param(
            normal_init(rngs, (config.num_patches + 1, config.hidden_size), param_dtype),
            (None, "embed"))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[batch, image_size, image_size, channels] -> [batch, num_patches + 1, embed]."""
        b, h, w, c = pixel_values.shape
        size, ch = self.config.image_size, self.config.num_channels
        if (h, w, c) != (size, size, ch):
            raise ValueError(f"CLIP expects pixel_values [batch, {size}, {size}, {ch}] (NHWC, "
                             f"image_size from the vision config), got {pixel_values.shape}")
        patches = self.patch_embedding(pixel_values)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding[...].astype(self.dtype)


class CLIPAttention(nnx.Module):
    """Bidirectional multi-head self-attention, no mask; softmax in f32 (`attention`: the
    implementation, `models.attention.IMPLEMENTATIONS`)."""

    def __init__(self, config: VisionConfig, *, attention: str = "auto", dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.dtype, self.attention = dtype, attention
        dense = functools.partial(Dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(d, d, ("embed", "heads"))
        self.k_proj = dense(d, d, ("embed", "heads"))
        self.v_proj = dense(d, d, ("embed", "heads"))
        self.out_proj = dense(d, d, ("heads", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[batch, length, embed] -> [batch, length, embed]."""
        b, n, _ = x.shape

        def heads(t):  # [batch, heads, length, head_dim]
            t = t.reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
            return sharding.constrain(t, ("batch", "act_heads", "length", None))

        q = heads(self.q_proj(x) * jnp.asarray(self.head_dim**-0.5, self.dtype))
        out = attention.self_attention(q, heads(self.k_proj(x)), heads(self.v_proj(x)), None, causal=False,
                                       implementation=self.attention)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, self.num_heads * self.head_dim))


class CLIPMLP(nnx.Module):
    """fc1 -> activation (quick_gelu for CLIP) -> fc2."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        dense = functools.partial(Dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = dense(config.hidden_size, config.intermediate_size, ("embed", "mlp"))
        self.fc2 = dense(config.intermediate_size, config.hidden_size, ("mlp", "embed"))
        self.act = activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: VisionConfig, *, attention: str = "auto", dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        eps = config.layer_norm_eps
        self.self_attn = CLIPAttention(config, attention=attention, **kw)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps, param_dtype=param_dtype)
        self.mlp = CLIPMLP(config, **kw)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[batch, length, embed] -> [batch, length, embed]."""
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return sharding.constrain(x, HIDDEN_AXES)


class CLIPEncoder(nnx.Module):
    """`layers`: a list of `CLIPEncoderLayer`, or one scanned stack ([layers, ...] params)."""

    def __init__(self, config: VisionConfig, *, scan_layers: bool, remat_policy: str, attention: str,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.scan_layers, self.remat_policy = scan_layers, remat_policy
        self.layers = make_layers(
            lambda r: CLIPEncoderLayer(config, attention=attention, dtype=dtype, param_dtype=param_dtype,
                                       rngs=r),
            config.num_hidden_layers, scan_layers, rngs)

    def __call__(self, x: jax.Array, num_layers: int, output_hidden_states: bool = False):
        """Runs the first `num_layers` layers on [batch, length, embed]; returns the last
        output and, if `output_hidden_states`, every layer's output [num_layers, batch, length, embed]."""
        if num_layers == 0:
            return x, (x[None][:0] if output_hidden_states else None)

        def body(layer, h, _):
            h = layer(h)
            return h, (h if output_hidden_states else None)

        return apply_layers(self.layers, x, None, body, scan=self.scan_layers,
                            remat_policy=self.remat_policy, num_layers=num_layers)


class CLIPVisionModel(nnx.Module):
    """HF `CLIPVisionModel`: embeddings -> pre_layrnorm -> encoder (-> post_layernorm, which
    LLaVA does not use; kept so checkpoints round-trip)."""

    def __init__(self, config: VisionConfig, *, scan_layers: bool = False,
                 remat_policy: str = "none", attention: str = "auto", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(config, **kw)
        self.pre_layrnorm = LayerNorm(d, eps, param_dtype=param_dtype)
        self.encoder = CLIPEncoder(config, scan_layers=scan_layers, remat_policy=remat_policy,
                                   attention=attention, **kw)
        self.post_layernorm = LayerNorm(d, eps, param_dtype=param_dtype)

    def num_layers_for(self, feature_layer: int) -> int:
        """How many encoder layers produce HF's `hidden_states[feature_layer]`."""
        n = self.config.num_hidden_layers
        if not -(n + 1) <= feature_layer <= n:
            raise ValueError(f"feature_layer {feature_layer} out of range for {n} CLIP layers "
                             f"(hidden states are indexed {-(n + 1)}..{n})")
        return feature_layer % (n + 1)

    def __call__(self, pixel_values: jax.Array, feature_layer: int = -2,
                 output_hidden_states: bool = False):
        """[batch, image_size, image_size, channels] -> HF `hidden_states[feature_layer]`,
        [batch, num_patches + 1, embed] in `dtype` (CLS first).

        With `output_hidden_states`, returns `(hidden, hidden_states)` where `hidden_states`
        [k + 1, batch, num_patches + 1, embed] stacks HF's `hidden_states[0..k]` for the k
        layers that were run (so `hidden_states[-1] is hidden`).
        """
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x = sharding.constrain(x, HIDDEN_AXES)
        out, per_layer = self.encoder(x, self.num_layers_for(feature_layer), output_hidden_states)
        if not output_hidden_states:
            return out
        return out, jnp.concatenate([x[None], per_layer], axis=0)

    def image_features(self, pixel_values: jax.Array, feature_layer: int = -2,
                       select_strategy: str = "default") -> jax.Array:
        """LLaVA's image features: [batch, num_patches, embed] ("default": CLS dropped) or
        [batch, num_patches + 1, embed] ("full")."""
        if select_strategy not in SELECT_STRATEGIES:
            raise ValueError(f"select_strategy must be one of {SELECT_STRATEGIES}, got {select_strategy!r}")
        hidden = self(pixel_values, feature_layer)
        return hidden[:, 1:] if select_strategy == "default" else hidden
