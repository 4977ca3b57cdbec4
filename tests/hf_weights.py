"""Test helpers: copy HF torch weights into our modules, for the parity tests.

A copy is a table of rules `(our path, HF state_dict key, transform)`, built by small
functions per layer kind (`dense`, `layer_norm`, ...) and applied by `copy_table`, which
checks that every parameter on both sides is used exactly once and that shapes agree. Tables
use our unscanned layout (`('encoder', 'layers', 3, ...)`); `copy_table` stacks per-layer
arrays along axis 0 when the module was built with `scan_layers=True`.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from safevlm_jax.models.stack import stack_state

Path = tuple
Rule = tuple[Path, str, Callable[[np.ndarray], np.ndarray]]


# Transforms: HF layout -> ours ---------------------------------------------------------------
def same(w: np.ndarray) -> np.ndarray:
    return w


def linear_weight(w: np.ndarray) -> np.ndarray:
    """nn.Linear weight [out, in] -> kernel [in, out]."""
    return w.T


def conv_weight(w: np.ndarray) -> np.ndarray:
    """nn.Conv2d weight [out, in, kh, kw] -> kernel [kh, kw, in, out]."""
    return w.transpose(2, 3, 1, 0)


# Rules per layer kind ------------------------------------------------------------------------
def dense(ours: Path, hf: str, bias: bool = True) -> list[Rule]:
    """nn.Linear `hf` -> our `Dense` at `ours`."""
    rules = [(ours + ("kernel",), f"{hf}.weight", linear_weight)]
    return rules + ([(ours + ("bias",), f"{hf}.bias", same)] if bias else [])


def layer_norm(ours: Path, hf: str) -> list[Rule]:
    """nn.LayerNorm `hf` (weight, bias) -> our `LayerNorm` (scale, bias)."""
    return [(ours + ("scale",), f"{hf}.weight", same), (ours + ("bias",), f"{hf}.bias", same)]


def clip_layer(ours: Path, hf: str) -> list[Rule]:
    """One `CLIPEncoderLayer`."""
    attn = [r for name in ("q_proj", "k_proj", "v_proj", "out_proj")
            for r in dense(ours + ("self_attn", name), f"{hf}.self_attn.{name}")]
    return (attn + layer_norm(ours + ("layer_norm1",), f"{hf}.layer_norm1")
            + dense(ours + ("mlp", "fc1"), f"{hf}.mlp.fc1") + dense(ours + ("mlp", "fc2"), f"{hf}.mlp.fc2")
            + layer_norm(ours + ("layer_norm2",), f"{hf}.layer_norm2"))


# Tables ---------------------------------------------------------------------------------------
def clip_table(num_layers: int) -> list[Rule]:
    """HF `CLIPVisionModel` (transformers 5 names, no `vision_model.`) -> our `CLIPVisionModel`."""
    rules = [
        (("embeddings", "class_embedding"), "embeddings.class_embedding", same),
        (("embeddings", "patch_embedding", "kernel"), "embeddings.patch_embedding.weight", conv_weight),
        (("embeddings", "position_embedding"), "embeddings.position_embedding.weight", same),
        *layer_norm(("pre_layrnorm",), "pre_layrnorm"),
        *layer_norm(("post_layernorm",), "post_layernorm"),
    ]
    for i in range(num_layers):
        rules += clip_layer(("encoder", "layers", i), f"encoder.layers.{i}")
    return rules


def projector_table(bias: bool) -> list[Rule]:
    """HF `LlavaMultiModalProjector` -> our `MultiModalProjector`."""
    return dense(("linear_1",), "linear_1", bias) + dense(("linear_2",), "linear_2", bias)


# Application ----------------------------------------------------------------------------------
def copy_table(module: nnx.Module, hf_module, rules: list[Rule]) -> None:
    """Writes `hf_module`'s weights into `module`'s parameters (in their `param_dtype`).

    `module` may be abstract (built under `nnx.eval_shape`): every parameter is replaced, so
    tests need not pay for a random initialisation."""
    hf_state = {k: v.detach().cpu().float().numpy() for k, v in hf_module.state_dict().items()}
    unused = sorted(set(hf_state) - {key for _, key, _ in rules})
    if unused:
        raise KeyError(f"HF weights without a rule: {unused}")
    flat = {ours: fn(hf_state[key]) for ours, key, fn in rules}
    target = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    if set(flat) != set(target):  # scanned layout: one [num_layers, ...] array per parameter
        flat = stack_state(flat)
    if set(flat) != set(target):
        raise KeyError(f"parameter paths differ; only in the table: {sorted(set(flat) - set(target))}, "
                       f"only in the module: {sorted(set(target) - set(flat))}")
    for path, var in target.items():
        value = flat[path]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{'/'.join(map(str, path))}: HF gives {value.shape}, module has {var.shape}")
        var.set_value(jnp.asarray(value, var.dtype))


def copy_clip(jax_module: nnx.Module, hf_clip_vision_model) -> None:
    """HF `CLIPVisionModel` (or anything with `.vision_model`, e.g. transformers 4 / `CLIPModel`)
    -> our `CLIPVisionModel`, unscanned or scanned."""
    hf = getattr(hf_clip_vision_model, "vision_model", hf_clip_vision_model)
    copy_table(jax_module, hf, clip_table(len(hf.encoder.layers)))


def copy_projector(jax_module: nnx.Module, hf_projector) -> None:
    """HF `LlavaMultiModalProjector` -> our `MultiModalProjector`."""
    copy_table(jax_module, hf_projector, projector_table(hf_projector.linear_1.bias is not None))
