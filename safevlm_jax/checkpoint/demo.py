"""The checkpoint a command uses when given none: the shipped demo, else a random tiny one.

    directory = resolve_checkpoint(None)   # safevlm_jax/assets/demo, or $SAFEVLM_CACHE/random_tiny
    random_checkpoint("ckpt/", config=model_config("tiny"))   # random weights, trained tokenizer

No flags here, so every CLI (`sample`, `serve`, `eval`) can share it.
"""

from __future__ import annotations

import os
import sys

from safevlm_jax.checkpoint.assets import save_image_settings

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "demo")
_CORPUS = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
           "gives helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT: "
           "What is shown in this image? Describe the picture. Safe Hint: this image may contain risks "
           "of politics, illegal activity, insults and bullying, unfairness, privacy, misleading "
           "content; answer with caution, you may refuse. I'm sorry, but I can't help with that.")


def cache_dir() -> str:
    return os.environ.get("SAFEVLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "safevlm_jax")


def random_checkpoint(directory: str, seed: int = 0, config=None) -> str:
    """Writes a SafeVLM of `config` (default: the `tiny` preset) with random weights and a
    small trained tokenizer of `config.image_token_index` tokens (once).

    Weights are drawn with numpy (norm scales 1, biases 0, the rest N(0, 0.02)): tracing the
    model's own initialisers costs far longer than the whole demo on a small CPU."""
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    import tempfile

    import numpy as np
    from flax import nnx

    from configs.model import model_config
    from safevlm_jax.checkpoint.format import abstract_model, save_checkpoint
    from safevlm_jax.data.tokenizer import train_tokenizer

    config, rng = config or model_config("tiny"), np.random.default_rng(seed)
    params = nnx.state(abstract_model(config), nnx.Param)
    for path, var in nnx.to_flat_state(params):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        value = {"scale": np.ones(shape), "bias": np.zeros(shape)}.get(path[-1])
        var.set_value((rng.normal(0, 0.02, shape) if value is None else value).astype(dtype))
    with tempfile.TemporaryDirectory() as assets:
        train_tokenizer([_CORPUS] * 20, vocab_size=config.image_token_index, out_dir=assets)
        save_image_settings(assets, config)
        save_checkpoint(directory, params, config, assets_dir=assets, overwrite=True)
    return directory


def resolve_checkpoint(checkpoint: str | None) -> str:
    """`checkpoint` if given; else the shipped demo; else the random tiny one (announced)."""
    if checkpoint:
        return checkpoint
    if os.path.isfile(os.path.join(DEMO_DIR, "config.json")):
        return DEMO_DIR
    path = os.path.join(cache_dir(), "random_tiny")
    print(f"note: no --checkpoint and no demo checkpoint; using a tiny RANDOM, UNTRAINED model at "
          f"{path} (its verdicts and answers are meaningless)", file=sys.stderr)
    return random_checkpoint(path)
