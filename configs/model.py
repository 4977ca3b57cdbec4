"""Model presets: `get_config("tiny" | "llava_7b" | "llava_13b")`.

Returns a ConfigDict with one field, `model`, whose keys are those of
`safevlm_jax.config.ModelConfig` (LLaVA-1.5 sizes: docs/architecture.md; safety modules:
docs/safety_modules.md). For a real checkpoint prefer `ModelConfig.from_hf(dir)`, which reads its
`config.json`.
"""

import ml_collections

from safevlm_jax.config import ModelConfig, SafetyConfig, TextConfig, VisionConfig


def _tiny() -> ModelConfig:
    """Runs in seconds on CPU; GQA (4 query heads, 2 kv heads) so that path is always tested."""
    return ModelConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, image_size=28, patch_size=7),
        text=TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512),
        safety=SafetyConfig(num_tokens=8, abstractor_hidden_size=48, head_num_heads=4),
        image_token_index=500,
        pad_token_id=501,
    )


def _llava(size: str) -> ModelConfig:
    d, layers, heads, mlp = {"7b": (4096, 32, 32, 11008), "13b": (5120, 40, 40, 13824)}[size]
    return ModelConfig(
        vision=VisionConfig(),
        text=TextConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=heads, intermediate_size=mlp),
        dtype="bfloat16",
        scan_layers=True,
    )


PRESETS = {"tiny": _tiny, "llava_7b": lambda: _llava("7b"), "llava_13b": lambda: _llava("13b")}


def model_config(preset: str) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
    return PRESETS[preset]()


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"model": model_config(arg).to_dict()})
