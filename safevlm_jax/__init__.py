"""SafeVLM in JAX / Flax NNX: LLaVA-1.5 with a safety projector, safety tokens and a safety head.

The entry points a user writes in Python (each imported on first use, so `import safevlm_jax`
loads neither JAX nor transformers):

    config, model = safevlm_jax.load_checkpoint("ckpt/")        # ModelConfig, SafeVLM
    vlm = safevlm_jax.SafeVLMInference.from_checkpoint("ckpt/")
    [result] = vlm.answer([safevlm_jax.Request("cat.jpg", "What is shown here?")])
    result.verdict.line(), result.answer                         # Verdict, text
    engine = safevlm_jax.Engine.from_checkpoint("ckpt/").start()    # continuous batching (serve)
    handle = engine.submit(safevlm_jax.EngineRequest(pixel_values, "What is shown here?"))
    guard = safevlm_jax.Guard.from_checkpoint("ckpt/")           # the verdict alone, no LLM
    level_probs, type_probs = guard(pixel_values)                # [B, 4], [B, 7]
    verdicts = safevlm_jax.RiskPolicy().verdicts(level_logits, type_logits)
    metrics = safevlm_jax.train.train(config, "workdir/")        # configs/stage1.py, stage2.py

`safevlm_jax.train` is the training package, so its entry point is `safevlm_jax.train.train`.
Weight conversion (HF LLaVA <-> ours, the authors' safety modules) is in `checkpoints_tools`,
which stands on this library and is never imported by it (README, "Python API").
docs/architecture.md says which module does what.
"""

from __future__ import annotations

import importlib
import logging

# public name -> module that defines it
_EXPORTS = {
    "ModelConfig": "safevlm_jax.config",
    "SafeVLM": "safevlm_jax.models.safevlm",
    "load_checkpoint": "safevlm_jax.checkpoint.format",
    "save_checkpoint": "safevlm_jax.checkpoint.format",
    "SafeVLMInference": "safevlm_jax.inference.pipeline",
    "Request": "safevlm_jax.inference.pipeline",
    "Result": "safevlm_jax.inference.pipeline",
    "SamplingParams": "safevlm_jax.inference.requests",
    "Engine": "safevlm_jax.inference.engine",
    "EngineRequest": "safevlm_jax.inference.requests",
    "Guard": "safevlm_jax.guard.model",
    "Verdict": "safevlm_jax.safety.verdict",
    "RiskPolicy": "safevlm_jax.safety.policy",
    "load_policy": "safevlm_jax.safety.policy",
    "HintConfig": "safevlm_jax.safety.hints",
    "load_hints": "safevlm_jax.safety.hints",
}

# library modules reachable as attributes (`safevlm_jax.train.train`) without importing them
# first; the command-line modules (sample, scan, plan) are not among them
_SUBMODULES = ("checkpoint", "config", "data", "eval", "guard", "inference", "kernels", "models",
               "safety", "sharding", "train")

__all__ = sorted(_EXPORTS)


class _NoTorchNotice(logging.Filter):
    """Drops transformers' import-time notice that PyTorch is missing ("Models won't be
    available"): this package uses its tokenizers and configs alone, which need no PyTorch."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found.")


# Installed before transformers is first imported: `python -m safevlm_jax.…` and every module of
# the package run this file first, and checkpoints_tools' modules import the package before
# anything that imports transformers (tests/test_quiet_commands.py). The notice is logged on
# this logger itself, so a filter here sees it.
logging.getLogger("transformers").addFilter(_NoTorchNotice())


def __getattr__(name: str):
    """Imports the module of a public name (or a library submodule) on first use."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # which sets the attribute
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'safevlm_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
