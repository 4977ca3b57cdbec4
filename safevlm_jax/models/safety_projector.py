"""Safety projector: Honeybee's C-Abstractor over CLIP patch features
(docs/safety_modules.md).

    features [B, N, C] -> grid [B, √N, √N, C] -> net_0 (RegStage C -> h) -> adaptive average
    pool to [B, √Q, √Q, h] -> net_2 (RegStage h -> h) -> [B, Q, h] -> readout_0 · SiLU ·
    readout_2 -> [B, Q, d]

Feature maps are channels-last (NHWC); conv kernels are [kh, kw, in/groups, out] (torch:
[out, in/groups, kh, kw]). Sub-module names follow the authors' keys
(`safe_mm_projector.proj.net.0.b1.conv1.conv.weight` -> `net_0/b1/conv1/conv/kernel`,
`....bn.weight` -> `.../bn/scale`, `readout.0.weight` -> `readout_0/kernel`), so a checkpoint
converter needs only renames and transposes. The blocks are timm's RegNet `Bottleneck` with
stride 1, bottle_ratio 1, group_size 1 (depthwise 3×3), se_ratio 0.25, SiLU and LayerNorm2d.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safevlm_jax import sharding
from safevlm_jax.config import ModelConfig
from safevlm_jax.models.layers import Dense, LayerNorm
from safevlm_jax.models.params import fan_in_init, param

MAP_AXES = ("batch", None, None, "embed")  # [B, H, W, channels]


class Conv2d(nnx.Module):
    """`torch.nn.Conv2d` with stride 1 and padding kernel_size // 2, on [B, H, W, in] maps.

    kernel [k, k, in/groups, out], initialised like torch (U(±1/√fan_in)); bias [out] zeros.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int,
                 axes: tuple[str | None, ...], *, groups: int = 1, use_bias: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        fan_in = in_features // groups * kernel_size**2
        shape = (kernel_size, kernel_size, in_features // groups, out_features)
        self.kernel = param(fan_in_init(rngs, shape, param_dtype, fan_in), axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[-1],)) if use_bias else None
        self.groups = groups
        self.padding = kernel_size // 2
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, in] -> [B, H, W, out] in `dtype`."""
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=(1, 1),
            padding=((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class ConvNormAct(nnx.Module):
    """timm's `ConvNormAct`: `conv` (no bias) -> `bn` (LayerNorm2d over channels) -> SiLU?"""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, eps: float,
                 groups: int = 1, apply_act: bool = True, dtype, param_dtype, rngs: nnx.Rngs):
        # Shard the big channel axis: the input of a dense 1x1 conv, the channels of a depthwise.
        axes = (None, None, None, "embed") if groups > 1 else (None, None, "embed", None)
        self.conv = Conv2d(in_features, out_features, kernel_size, axes, groups=groups,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn = LayerNorm(out_features, eps, param_dtype=param_dtype)
        self.apply_act = apply_act

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, in] -> [B, H, W, out]."""
        x = self.bn(self.conv(x))
        return jax.nn.silu(x) if self.apply_act else x


class SqueezeExcite(nnx.Module):
    """timm's `SEModule`: x · sigmoid(fc2(SiLU(fc1(mean_hw(x))))), fc1/fc2 1x1 convs with bias."""

    def __init__(self, channels: int, rd_channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Conv2d(channels, rd_channels, 1, (None, None, "embed", None), **kw)
        self.fc2 = Conv2d(rd_channels, channels, 1, (None, None, None, "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = self.fc2(jax.nn.silu(self.fc1(s)))
        return x * jax.nn.sigmoid(s).astype(x.dtype)


class Bottleneck(nnx.Module):
    """timm's RegNet `Bottleneck` (stride 1, bottle_ratio 1, group_size 1): in -> out channels.

    conv1 (1x1) -> conv2 (3x3 depthwise) -> se -> conv3 (1x1, no act); + shortcut
    (`downsample` = 1x1 conv + LN when in != out, else identity); SiLU.
    """

    def __init__(self, in_chs: int, out_chs: int, *, se_ratio: float, eps: float, dtype,
                 param_dtype, rngs: nnx.Rngs):
        mid = out_chs  # bottle_ratio 1
        kw = dict(eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = ConvNormAct(in_chs, mid, 1, **kw)
        self.conv2 = ConvNormAct(mid, mid, 3, groups=mid, **kw)  # group_size 1: depthwise
        # timm sizes the squeeze from the block's *input* width: int(round(in_chs * se_ratio)).
        self.se = SqueezeExcite(mid, int(round(in_chs * se_ratio)), dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
        self.conv3 = ConvNormAct(mid, out_chs, 1, apply_act=False, **kw)
        self.downsample = (ConvNormAct(in_chs, out_chs, 1, apply_act=False, **kw)
                           if in_chs != out_chs else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, in] -> [B, H, W, out]."""
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return jax.nn.silu(y + shortcut.astype(y.dtype))


class RegStage(nnx.Module):
    """timm's `RegStage`: blocks `b1` (in -> out), `b2` ... `b{depth}` (out -> out)."""

    def __init__(self, depth: int, in_chs: int, out_chs: int, *, se_ratio: float, eps: float,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.depth = depth
        for i in range(depth):
            setattr(self, f"b{i + 1}", Bottleneck(in_chs if i == 0 else out_chs, out_chs,
                                                  se_ratio=se_ratio, eps=eps, dtype=dtype,
                                                  param_dtype=param_dtype, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, in] -> [B, H, W, out]."""
        for i in range(self.depth):
            x = getattr(self, f"b{i + 1}")(x)
        return sharding.constrain(x, MAP_AXES)


def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] averaging weights of torch's adaptive pool along one axis: output i
    averages input [floor(i·n_in/n_out), ceil((i+1)·n_in/n_out))."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool2d(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`torch.nn.functional.adaptive_avg_pool2d` on [B, H, W, C] -> [B, size[0], size[1], C].

    The windows are rectangles, so the average separates into one matrix per spatial axis
    (summed in f32). Identity when the size already matches (the 336 px default, Q = N).
    """
    if x.shape[1:3] == tuple(size):
        return x
    ph = jnp.asarray(_pool_matrix(x.shape[1], size[0]))
    pw = jnp.asarray(_pool_matrix(x.shape[2], size[1]))
    y = jnp.einsum("oh,bhwc,pw->bopc", ph, x.astype(jnp.float32), pw)
    return y.astype(x.dtype)


class SafetyProjector(nnx.Module):
    """C-Abstractor: CLIP features [B, N, C] -> safety features [B, Q, d] (docs/safety_modules.md).

    `net_0`: RegStage C -> h; (`net.1` is the parameter-free adaptive pool); `net_2`: RegStage
    h -> h; `readout_0` [h, d] · SiLU · `readout_2` [d, d]. h = `config.abstractor_hidden_size`,
    Q = `config.num_queries` (a square), d = `config.text.hidden_size`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        s = config.safety
        c, h, d = config.vision.hidden_size, config.abstractor_hidden_size, config.text.hidden_size
        self.side = math.isqrt(config.num_queries)
        if self.side**2 != config.num_queries:
            raise ValueError(f"safety.num_queries must be a square, got {config.num_queries}")
        dtype, param_dtype = config.compute_dtype, config.weights_dtype
        kw = dict(se_ratio=s.se_ratio, eps=s.layer_norm_eps, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        self.net_0 = RegStage(s.depth, c, h, **kw)
        self.net_2 = RegStage(s.depth, h, h, **kw)
        self.readout_0 = Dense(h, d, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.readout_2 = Dense(d, d, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        """[B, N, C] patch features (N a square, row-major grid) -> [B, Q, d] in compute dtype."""
        b, n, c = features.shape
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"safety projector needs a square patch grid, got {n} features")
        x = sharding.constrain(features.reshape(b, g, g, c), MAP_AXES)
        x = self.net_0(x)
        x = adaptive_avg_pool2d(x, (self.side, self.side))
        x = self.net_2(x)
        x = x.reshape(b, self.side * self.side, x.shape[-1])
        x = self.readout_2(jax.nn.silu(self.readout_0(x)))
        return sharding.constrain(x, ("batch", "length", "embed"))
