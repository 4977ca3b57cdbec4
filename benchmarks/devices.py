"""What the benchmarks share about devices: JAX and torch on one accelerator, the torch device
that matches JAX's, and host-side timing that waits for the device.

Import it before jax: on a GPU both frameworks allocate from the same memory, so JAX must not
preallocate (its default takes 75% of the GPU before torch gets any).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import jax  # noqa: E402
import torch  # noqa: E402


def torch_device(name: str) -> torch.device:
    """`auto`: CUDA when JAX's default backend is a GPU (the same chip), else the CPU."""
    if name == "auto":
        name = "cuda" if jax.default_backend() == "gpu" else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Waits for torch's queued work (a host clock read after it covers the device's time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Gives torch's cached blocks back, so that JAX can allocate them next."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
