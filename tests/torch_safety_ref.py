"""Plain-PyTorch reference of the SafeVLM safety modules (docs/safety_modules.md), for parity tests
only.

Rebuilt from timm's RegNet `Bottleneck`/`RegStage`/`SEModule`/`LayerNorm2d` and Honeybee's
`CAbstractor` (no timm/torchvision here), with module names chosen so `state_dict()` keys are
the authors' (`net.0.b1.conv1.conv.weight`, `readout.0.weight`, `cross_attention.in_proj_weight`
...). `load_into_jax` copies such a state_dict into our Flax modules.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """timm: LayerNorm over channels of an NCHW map (permute to NHWC and back)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNormAct(nn.Module):
    def __init__(self, in_chs, out_chs, kernel_size, groups=1, apply_act=True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2,
                              groups=groups, bias=False)
        # timm swaps LayerNorm2d for LayerNormAct2d inside ConvNormAct: eps 1e-5, not 1e-6.
        self.bn = LayerNorm2d(out_chs, eps=1e-5)
        self.act = nn.SiLU() if apply_act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SEModule(nn.Module):
    def __init__(self, channels, rd_channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)

    def forward(self, x):
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class Bottleneck(nn.Module):
    """timm RegNet Bottleneck: stride 1, bottle_ratio 1, group_size 1, se_ratio 0.25, SiLU."""

    def __init__(self, in_chs, out_chs, se_ratio=0.25):
        super().__init__()
        mid = out_chs
        self.conv1 = ConvNormAct(in_chs, mid, 1)
        self.conv2 = ConvNormAct(mid, mid, 3, groups=mid)
        self.se = SEModule(mid, int(round(in_chs * se_ratio)))
        self.conv3 = ConvNormAct(mid, out_chs, 1, apply_act=False)
        self.act3 = nn.SiLU()
        self.downsample = (ConvNormAct(in_chs, out_chs, 1, apply_act=False)
                           if in_chs != out_chs else nn.Identity())

    def forward(self, x):
        shortcut = x
        x = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(x + self.downsample(shortcut))


class RegStage(nn.Module):
    def __init__(self, depth, in_chs, out_chs):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(in_chs if i == 0 else out_chs, out_chs))

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


class CAbstractor(nn.Module):
    """Honeybee C-Abstractor: [B, N, C] -> [B, Q, d]."""

    def __init__(self, encoder_hidden_size, hidden_size, output_hidden_size, num_queries, depth=3):
        super().__init__()
        hw = int(num_queries**0.5)
        self.net = nn.Sequential(RegStage(depth, encoder_hidden_size, hidden_size),
                                 nn.AdaptiveAvgPool2d((hw, hw)),
                                 RegStage(depth, hidden_size, hidden_size))
        self.readout = nn.Sequential(nn.Linear(hidden_size, output_hidden_size), nn.SiLU(),
                                     nn.Linear(output_hidden_size, output_hidden_size))

    def forward(self, x):
        b, n, c = x.shape
        hw = int(n**0.5)
        x = x.transpose(1, 2).reshape(b, c, hw, hw)  # "b (h w) d -> b d h w"
        x = self.net(x)
        x = x.flatten(2).transpose(1, 2)  # "b d h w -> b (h w) d"
        return self.readout(x)


class SafetyHead(nn.Module):
    """The authors' `safe_part`: attend from every text position, classify position 0."""

    def __init__(self, d, num_heads=8, num_levels=4, num_types=7):
        super().__init__()
        self.cross_attention = nn.MultiheadAttention(d, num_heads, batch_first=True)
        self.safety_head = nn.Linear(d, num_levels)
        self.other_head = nn.Linear(d, num_types)

    def forward(self, text_embeds, safety_tokens, projected):
        """text_embeds [B, T, d], safety_tokens [1, T_s, d], projected [B, Q, d]."""
        keys = torch.cat([safety_tokens.expand(projected.shape[0], -1, -1), projected], dim=1)
        out = self.cross_attention(text_embeds, keys, keys, need_weights=False)[0][:, 0]
        return self.safety_head(out), self.other_head(out)


def _jax_path(key: str) -> list[str]:
    """'net.0.b1.conv1.bn.weight' -> ['net_0', 'b1', 'conv1', 'bn', 'weight'] (unchanged leaf)."""
    parts = key.split(".")
    out = []
    for p in parts:
        if p.isdigit():
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    return out


def _to_jax(key: str, value: np.ndarray) -> list[tuple[list[str], np.ndarray]]:
    """One torch (key, tensor) -> [(our path, array)]: renames, transposes, in_proj split."""
    path = _jax_path(key)
    *mod, leaf = path
    if leaf in ("in_proj_weight", "in_proj_bias"):
        chunks = np.split(value, 3, axis=0)
        kind = "kernel" if leaf == "in_proj_weight" else "bias"
        return [(mod + [f"{n}_proj", kind], c.T if kind == "kernel" else c)
                for n, c in zip("qkv", chunks)]
    if leaf == "weight":
        if value.ndim == 4:  # conv [out, in/g, kh, kw] -> [kh, kw, in/g, out]
            return [(mod + ["kernel"], value.transpose(2, 3, 1, 0))]
        if value.ndim == 2:  # linear [out, in] -> [in, out]
            return [(mod + ["kernel"], value.T)]
        return [(mod + ["scale"], value)]  # LayerNorm
    return [(path, value)]


def load_into_jax(module: nnx.Module, torch_module: nn.Module) -> None:
    """Copies every torch parameter into `module` (shapes checked); every JAX param must be hit.

    `module` may be abstract (`nnx.eval_shape`): that skips the random init the copy overwrites.
    """
    written = set()
    for key, tensor in torch_module.state_dict().items():
        for path, value in _to_jax(key, tensor.detach().cpu().numpy()):
            target = module
            for name in path[:-1]:
                target = getattr(target, name)
            var = getattr(target, path[-1])
            old = var.get_value()
            if old.shape != value.shape:
                raise ValueError(f"{key} -> {'/'.join(path)}: shape {value.shape}, "
                                 f"expected {old.shape}")
            var.set_value(jnp.asarray(value, old.dtype))
            written.add(tuple(path))
    ours = {tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    if ours != written:
        raise ValueError(f"unmatched parameters: ours only {sorted(ours - written)}, "
                         f"torch only {sorted(written - ours)}")
