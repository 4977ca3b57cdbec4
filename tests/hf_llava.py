"""Test helpers: tiny random HF LLaVA directories (transformers' own `save_pretrained`)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers

from checkpoints_tools.safetensors_io import SafetensorsDir
from safevlm_jax.config import SafetyConfig

TINY_SAFETY = SafetyConfig(num_tokens=8, abstractor_hidden_size=48, head_num_heads=4)


TINY_VOCAB = (512, 500, 501)  # vocab size, <image>, <pad> of the tiny tokenizers
LLAVA_VOCAB = (32064, 32000, 32001)  # llava-hf's, for the real LLaMA tokenizer


def tiny_llava_config(tie: bool = False, kv_heads: int = 2, vocab: tuple[int, int, int] = TINY_VOCAB
                      ) -> transformers.LlavaConfig:
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=28, patch_size=7)
    text = transformers.LlamaConfig(vocab_size=vocab[0], hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=kv_heads, max_position_embeddings=512,
                                    tie_word_embeddings=tie)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab[1],
                                    pad_token_id=vocab[2], tie_word_embeddings=tie)


def save_tiny_llava(directory: str, dtype=torch.float32, tie: bool = False, kv_heads: int = 2,
                    max_shard_size: str = "50GB", seed: int = 0, vocab: tuple[int, int, int] = TINY_VOCAB):
    """A random tiny LLaVA saved to `directory` (`vocab`: size, image and pad ids); returns the
    (f32, eval) torch model."""
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(tiny_llava_config(tie, kv_heads, vocab)).eval()
    with torch.no_grad():  # HF zero-inits biases / unit norms: randomise so nothing is trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.to(dtype).save_pretrained(directory, max_shard_size=max_shard_size)
    return model.float()


def read_all(directory: str) -> dict[str, np.ndarray]:
    out = {}
    for _, tensors in SafetensorsDir(directory).iter_shards():
        out.update(dict(tensors))
    return out


def rename_keys(directory: str, fn) -> None:
    """Rewrites every safetensors file (and the index) of `directory` with keys `fn(key)`."""
    from safetensors.numpy import save_file

    src = SafetensorsDir(directory)
    for name in src.files:
        path = os.path.join(directory, name)
        tensors = {fn(k): v for k, v in read_all_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            data = json.load(f)
        data["weight_map"] = {fn(k): v for k, v in data["weight_map"].items()}
        with open(index, "w") as f:
            json.dump(data, f)


def read_all_file(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
