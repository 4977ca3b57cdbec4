"""One tiny SafeVLM and its checkpoint per test session, shared by the guard and scan tests
(building a model costs seconds on CPU)."""

import atexit
import dataclasses
import functools
import json
import os
import shutil
import tempfile

from flax import nnx

from configs.model import model_config
from safevlm_jax.checkpoint.format import save_checkpoint
from safevlm_jax.data.tokenizer import train_tokenizer
from safevlm_jax.models.safevlm import SafeVLM

LLM_MLP = 104  # an LLM MLP width no other part of the model has, to spot decoder layers in a jaxpr


@functools.cache
def tiny_model() -> SafeVLM:
    config = model_config("tiny")
    config = config.replace(text=dataclasses.replace(config.text, intermediate_size=LLM_MLP))
    return SafeVLM(config, rngs=nnx.Rngs(0))


@functools.cache
def tiny_checkpoint() -> str:
    """The model saved with a tiny tokenizer and a "pad" preprocessor config."""
    root = tempfile.mkdtemp(prefix="safevlm_guard_test_")
    atexit.register(shutil.rmtree, root, True)
    model, assets = tiny_model(), os.path.join(root, "assets")
    train_tokenizer(["What is shown in this image? A chat USER: ASSISTANT:"] * 10,
                    vocab_size=model.config.image_token_index, out_dir=assets)
    with open(os.path.join(assets, "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": model.config.vision.image_size, "image_aspect_ratio": "pad"}, f)
    return save_checkpoint(os.path.join(root, "ckpt"), model, model.config, assets_dir=assets)
