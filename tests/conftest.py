"""Test set-up: 8 fake CPU devices (before jax is imported) and full-precision f32 matmuls.

SAFEVLM_TEST_DEVICES=native keeps the machine's own devices instead (JAX's default platform,
e.g. one GPU, and no fake CPU devices): `benchmarks/device_check.sh` sets it to run the
accelerator-relevant tests there, selecting those that fit one device."""

import os

DEVICES = os.environ.get("SAFEVLM_TEST_DEVICES", "fake_cpu")
if DEVICES not in ("fake_cpu", "native"):
    raise ValueError(f"SAFEVLM_TEST_DEVICES must be fake_cpu or native, got {DEVICES!r}")
if DEVICES == "fake_cpu":
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
