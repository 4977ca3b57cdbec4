"""Logging: TensorBoard scalars (tensorboardX, no TensorFlow needed) and tqdm, on the chief.

MFU = model FLOPs / (step time x devices x peak), with model FLOPs per step =
tokens x (4·N_text + 2·N_trained) + images x 2·N_vision·patches: forward and input-gradient
passes through the LLM (also for frozen weights: gradients flow through them to the safety
tokens or LoRA), weight gradients only for trained parameters, and a forward pass of the
frozen vision tower. Attention score FLOPs are not counted (as in the 6·N·D convention).
"""

from __future__ import annotations

import os
import time

import jax
from flax import nnx

from safevlm_jax.checkpoint.io import is_primary, path_str

# Dense bf16 peak TFLOP/s per device, by `device_kind` prefix (vendor data sheets).
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v5": 459.0, "TPU v6 lite": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
               "NVIDIA A100": 312.0}


def peak_flops(configured_tflops: float = 0.0) -> float:
    """Per-device peak FLOP/s: the configured value, else the table, else 0 (unknown)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for prefix in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_TFLOPS[prefix] * 1e12
    return 0.0


def step_flops(trainable, frozen, num_tokens: int, num_images: int, num_patches: int) -> float:
    """Model FLOPs of one train step (see the module docstring); states may be abstract."""
    def count(state, prefix):
        return sum(v.get_value().size for p, v in nnx.to_flat_state(state)
                   if isinstance(v, nnx.Param) and path_str(p).startswith(prefix)
                   and "embed_tokens" not in path_str(p))
    n_text = count(trainable, "language_model") + count(frozen, "language_model")
    n_vision = count(frozen, "vision_tower") + count(trainable, "vision_tower")
    n_trained = count(trainable, "")
    return num_tokens * (4 * n_text + 2 * n_trained) + num_images * 2 * n_vision * num_patches


class MetricsLogger:
    """Writes scalars every `every` steps on process 0; timing covers the steps in between."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, every: int,
                 flops_per_step: float, tokens_per_step: int, peak: float):
        self.chief = is_primary()
        self.every, self.flops, self.tokens, self.peak = every, flops_per_step, tokens_per_step, peak
        self.writer = self.bar = None
        if self.chief:
            from tensorboardX import SummaryWriter
            from tqdm import tqdm

            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.last_time, self.last_step = time.perf_counter(), start_step

    def log(self, step: int, metrics) -> None:
        """`metrics`: the step's dict of device scalars (fetched only when logging)."""
        if step % self.every and step != 1:
            return
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt = (now - self.last_time) / max(step - self.last_step, 1)
        self.last_time, self.last_step = now, step
        scalars["step_time_s"] = dt
        scalars["tokens_per_s"] = self.tokens / dt
        if self.peak > 0:
            scalars["mfu"] = self.flops / dt / (self.peak * jax.device_count())
        if self.chief:
            for k, v in scalars.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}")
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.chief:
            self.writer.close()
            self.bar.close()
