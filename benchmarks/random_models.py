"""Random checkpoints for the serving benchmarks (no flags of its own, so any benchmark can
import it): `tiny` (configs/model.py) and `350m` (the ~350M f32 LLaMA of `sample_vs_hf.py`
with SPEC's safety modules)."""

from __future__ import annotations

import os


def write_checkpoint(directory: str, name: str) -> str:
    """The checkpoint `directory/name` of config `name` ("tiny" or "350m"), written once."""
    from configs.model import model_config
    from safevlm_jax.checkpoint.demo import random_checkpoint
    from safevlm_jax.config import SafetyConfig

    if name == "tiny":
        config = model_config("tiny")
    else:
        from benchmarks.sample_vs_hf import config_350m

        config = config_350m("float32").replace(safety=SafetyConfig())
    return random_checkpoint(os.path.join(directory, name), config=config)
