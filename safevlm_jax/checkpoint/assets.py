"""A checkpoint's image settings (`preprocessor_config.json`), as LLaVA-1.5 ships them."""

from __future__ import annotations

import json
import os

from safevlm_jax.config import ModelConfig
from safevlm_jax.data.images import CLIP_MEAN, CLIP_STD, ImageConfig


def image_config(directory: str, config: ModelConfig) -> ImageConfig:
    """Image settings of a checkpoint: size from the model config, mean/std from
    `preprocessor_config.json` (or `processor_config.json`'s `image_processor`), LLaVA-1.5's
    "pad" aspect mode unless the file says `image_aspect_ratio` otherwise."""
    settings = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path) as f:
                settings = json.load(f)
            settings = settings.get("image_processor", settings)
            break
    aspect = settings.get("image_aspect_ratio", "pad")
    return ImageConfig(image_size=config.vision.image_size,
                       aspect_mode="resize" if aspect in ("resize", "original") else aspect,
                       mean=tuple(settings.get("image_mean", CLIP_MEAN)),
                       std=tuple(settings.get("image_std", CLIP_STD)))


def save_image_settings(directory: str, config: ModelConfig) -> None:
    """Writes `preprocessor_config.json` as LLaVA-1.5 ships it (crop size, "pad" aspect;
    CLIP's mean/std by default), which `image_config` reads back."""
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": config.vision.image_size, "image_aspect_ratio": "pad"}, f)
