"""Test set-up: 8 fake CPU devices (before jax is imported), compiled at LLVM -O0, and
full-precision f32 matmuls. Modules start heaviest first (`HEAVY_FIRST`).

SAFEVLM_TEST_DEVICES=native keeps the machine's own devices instead (JAX's default platform,
e.g. one GPU, and no fake CPU devices): `benchmarks/device_check.sh` sets it to run the
accelerator-relevant tests there, selecting those that fit one device.

Shared fixtures (session scope: built once, on first use, for every module that asks):

- `demo_vlm`: the shipped demo checkpoint as a `SafeVLMInference`. Read only; a test that
  needs another policy or hints builds `SafeVLMInference(demo_vlm.model, demo_vlm.tokenizer,
  demo_vlm.images, policy=...)` around the same model.
- `demo_engine`: a started `Engine` over `demo_vlm` of `serve_helpers.DEMO_ENGINE`'s shape (8
  slots, the model's 512 positions; a queue of 64). Leave it as you found it: every request finished,
  nothing patched. Its counters are shared, so assert on differences (`stats()` before and
  after), not on totals. A test that shuts an engine down, fails its requests or needs other
  settings (a prefill chunk, no prefix cache, a small queue) builds its own with
  `serve_helpers.live_engine(demo_vlm, **DEMO_ENGINE, ...)`: an engine of the same shape runs
  the programs `demo_engine` compiled (jit's cache is keyed by the model's structure and the
  shapes), so it compiles nothing new.
- `demo_api`: a live uvicorn server (`serve_helpers.LiveServer`: `.url`, `.engine`, `.app`)
  over `demo_engine`, model id "demo", default `ServeSettings`. A module that needs other
  settings (a body limit, an API key) opens `serve_helpers.live_server(demo_engine, ...)`: a
  server costs a thread, not a compilation.
- `cli_env`: the environment for a `python -m safevlm_jax.…` subprocess: this process's (the
  fake devices) with the repository on PYTHONPATH and the session's JAX compilation cache (a
  fresh folder per run, holding every program however quick to compile), so a command reuses
  what an earlier one compiled for the same program. The tests' own process does not use that
  cache: a test that counts compilations would not see a program compiled again if it came
  from disk.
"""

import os

DEVICES = os.environ.get("SAFEVLM_TEST_DEVICES", "fake_cpu")
if DEVICES not in ("fake_cpu", "native"):
    raise ValueError(f"SAFEVLM_TEST_DEVICES must be fake_cpu or native, got {DEVICES!r}")
if DEVICES == "fake_cpu":
    # LLVM's -O0 for XLA:CPU: most of a test's time is compiling tiny programs, not running them
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The modules that take longest on CI's 2 cores, heaviest first. With `--dist loadfile` each
# worker takes whole modules in collection order, so these start first and the short modules
# fill in at the end; xdist's own order (most tests first) would leave a long module for last
# while the other worker idles.
HEAVY_FIRST = ("test_serve_lifecycle.py", "test_train_resume.py", "test_train_parallel.py", "test_safevlm.py",
               "test_train_multihost.py", "test_tpu_compile.py", "test_sample_cli.py", "test_engine.py",
               "test_attention.py", "test_inference_sharding.py", "test_llama.py", "test_demo.py",
               "test_sampler.py", "test_convert_hf.py", "test_clip.py", "test_checkpoint.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_config():
    """The `tiny` model preset as a ModelConfig."""
    from configs.model import model_config

    return model_config("tiny")


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict:
    """Environment variables for a command-line subprocess (see the module docstring)."""
    return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # every program, not only those over 1 s


@pytest.fixture(scope="session")
def demo_vlm():
    """The shipped demo checkpoint as a SafeVLMInference (read only; see the module docstring)."""
    from tests.serve_helpers import demo_inference

    return demo_inference()


@pytest.fixture(scope="session")
def demo_engine(demo_vlm):
    """A started Engine of DEMO_ENGINE's shape over demo_vlm, shared by every module."""
    from tests.serve_helpers import DEMO_ENGINE, live_engine

    with live_engine(demo_vlm, **DEMO_ENGINE, max_queue=64) as engine:
        yield engine


@pytest.fixture(scope="session")
def demo_api(demo_engine):
    """A live HTTP server (model id "demo", default settings) over demo_engine."""
    from tests.serve_helpers import live_server

    with live_server(demo_engine) as server:
        yield server
