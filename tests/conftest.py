"""Test set-up: 8 fake CPU devices (before jax is imported) and full-precision f32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")


@pytest.fixture(scope="session")
def tiny_config():
    """The `tiny` model preset as a ModelConfig."""
    from configs.model import model_config

    return model_config("tiny")
