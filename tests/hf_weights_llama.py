"""Test helper: copy an HF `LlamaForCausalLM` (optionally wrapped by peft LoRA) into ours.

HF Linear weight [out, in] -> kernel [in, out]; peft lora_A [r, in] -> lora_a [in, r] and
lora_B [out, r] -> lora_b [r, out]; RMSNorm weight -> scale; embed_tokens weight ->
embedding. A scanned model gets every layer parameter stacked on axis 0.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx


def hf_llama_state(hf_model) -> dict[str, np.ndarray]:
    """HF (or peft-wrapped HF) state dict with peft's prefixes removed: `model.layers.0...`."""
    out = {}
    for key, value in hf_model.state_dict().items():
        key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        out[key] = value.detach().float().numpy()
    return out


def _hf_value(hf: dict[str, np.ndarray], path: tuple) -> np.ndarray:
    """The HF array for one of our (unscanned) parameter paths, in our layout."""
    *parent, leaf = path
    if leaf == "lora_a":
        return hf[_dotted(parent[:-1]) + ".lora_A.weight"].T
    if leaf == "lora_b":
        return hf[_dotted(parent[:-1]) + ".lora_B.weight"].T
    if leaf == "embedding":
        return hf[_dotted(parent) + ".weight"]
    if leaf == "kernel":
        return hf[_dotted(parent) + ".weight"].T
    if leaf == "scale":
        return hf[_dotted(parent) + ".weight"]
    if leaf == "bias":
        return hf[_dotted(parent) + ".bias"]
    raise KeyError(f"no HF weight for {'/'.join(map(str, path))}")


def _dotted(parts) -> str:
    return ".".join(str(p) for p in parts)


def copy_llama_weights(hf_model, ours, num_layers: int) -> None:
    """Overwrites every parameter of our `LlamaForCausalLM` with the HF model's (in place)."""
    hf = hf_llama_state(hf_model)
    flat = nnx.to_flat_state(nnx.state(ours, nnx.Param))
    new = []
    for path, var in flat:
        shape = var.get_value().shape
        if "layers" in path and not isinstance(path[path.index("layers") + 1], int):  # scanned
            i = path.index("layers") + 1
            value = np.stack([_hf_value(hf, path[:i] + (n,) + path[i:]) for n in range(num_layers)])
        else:
            value = _hf_value(hf, path)
        if value.shape != shape:
            raise ValueError(f"{'/'.join(map(str, path))}: HF shape {value.shape} != ours {shape}")
        new.append((path, var.replace(jnp.asarray(value, var.get_value().dtype))))
    nnx.update(ours, nnx.from_flat_state(new))
