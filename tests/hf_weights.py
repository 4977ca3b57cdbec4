"""Test helpers: copy HF torch weights (CLIP, projector, LLaMA + peft LoRA, LLaVA) into our
modules, for the parity tests.

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


def llama_layer(ours: Path, hf: str, lora_targets: tuple[str, ...]) -> list[Rule]:
    """One `LlamaDecoderLayer` (no biases, as LLaMA-2), with peft LoRA on `lora_targets`."""
    rules = [(ours + (n, "scale"), f"{hf}.{n}.weight", same)
             for n in ("input_layernorm", "post_attention_layernorm")]
    for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        for n in names:
            at, key = ours + (block, n), f"{hf}.{block}.{n}"
            rules += dense(at, key, bias=False)
            if n in lora_targets:  # peft lora_A [r, in], lora_B [out, r] -> ours [in, r], [r, out]
                rules += [(at + ("lora", "lora_a"), f"{key}.lora_A.weight", linear_weight),
                          (at + ("lora", "lora_b"), f"{key}.lora_B.weight", linear_weight)]
    return rules


def llama_table(num_layers: int, tied: bool, lora_targets: tuple[str, ...] = ()) -> list[Rule]:
    """HF `LlamaForCausalLM` (optionally peft-wrapped) -> our `LlamaForCausalLM`."""
    rules = [(("model", "embed_tokens", "embedding"), "model.embed_tokens.weight", same),
             (("model", "norm", "scale"), "model.norm.weight", same)]
    for i in range(num_layers):
        rules += llama_layer(("model", "layers", i), f"model.layers.{i}", lora_targets)
    return rules if tied else rules + [(("lm_head", "kernel"), "lm_head.weight", linear_weight)]


# Application ----------------------------------------------------------------------------------
def torch_state(hf_module, prefix: str = "") -> dict[str, np.ndarray]:
    """A torch module's state dict as f32 numpy, keys prefixed, peft's wrapping removed
    (`base_model.model.`, `.base_layer`, `.default`)."""
    out = {}
    for key, value in hf_module.state_dict().items():
        key = key.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".default.", ".")
        out[prefix + key] = value.detach().cpu().float().numpy()
    return out


def copy_table(module: nnx.Module, hf_state: dict[str, np.ndarray], rules: list[Rule]) -> None:
    """Writes the HF weights `hf_state` (see `torch_state`) into `module`'s parameters (in their
    `param_dtype`).

    `module` may be abstract (built under `nnx.eval_shape`): every parameter is replaced, so
    tests need not pay for a random initialisation."""
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
    copy_table(jax_module, torch_state(hf), clip_table(len(hf.encoder.layers)))


def copy_projector(jax_module: nnx.Module, hf_projector) -> None:
    """HF `LlavaMultiModalProjector` -> our `MultiModalProjector`."""
    copy_table(jax_module, torch_state(hf_projector),
               projector_table(hf_projector.linear_1.bias is not None))


def copy_llama(jax_module: nnx.Module, hf_state: dict[str, np.ndarray]) -> None:
    """HF `LlamaForCausalLM` weights (`torch_state`, peft LoRA included) -> our `LlamaForCausalLM`."""
    c = jax_module.config
    if c.tie_word_embeddings:
        hf_state = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}
    targets = tuple({k.split(".")[-3] for k in hf_state if ".lora_A." in k})
    copy_table(jax_module, hf_state, llama_table(c.num_hidden_layers, c.tie_word_embeddings, targets))


def copy_llava(ours: nnx.Module, hf_llava) -> None:
    """HF `LlavaForConditionalGeneration` -> the LLaVA parts of our `SafeVLM`."""
    copy_clip(ours.vision_tower, hf_llava.model.vision_tower)
    copy_projector(ours.multi_modal_projector, hf_llava.model.multi_modal_projector)
    copy_llama(ours.language_model, {**torch_state(hf_llava.model.language_model, "model."),
                                     **torch_state(hf_llava.lm_head, "lm_head.")})
