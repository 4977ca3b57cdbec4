"""The CPU matrix-vector kernel for decode (safevlm_jax/kernels/matvec.cc): built, exact to
f32 accumulation against numpy, used only where it should be, and a bf16 decode step with it
matches the one without."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from configs.model import model_config
from safevlm_jax.kernels import matvec
from safevlm_jax.models import dot as dots
from safevlm_jax.models.layers import decode_mode
from safevlm_jax.models.kv_cache import KVCache
from safevlm_jax.models.safevlm import SafeVLM


def test_kernel_is_built_and_registered():
    """`pip install` builds it (setup.py); without it decode on CPU falls back to XLA's dots
    (bf16 weights at half the speed), so a broken build must fail here."""
    assert matvec.library_path() is not None
    assert matvec.available()


def reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w.astype(np.float64)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 7, 17), (3, 64, 300), (16, 1030, 33),
                                   (2, 512, 2051), (1, 4096, 1024)])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("w_dtype", [jnp.float32, jnp.bfloat16])
def test_matches_f32_accumulation(m, k, n, x_dtype, w_dtype):
    """Odd sizes (row blocks, masked column tails, the threaded path from 256 KiB of weights)."""
    rng = np.random.default_rng(m * 7 + k + n)
    x = jnp.asarray(rng.normal(size=(m, k)), x_dtype)
    w = jnp.asarray(rng.normal(size=(k, n)), w_dtype)
    got = np.asarray(jax.jit(matvec.matvec)(x, w).astype(jnp.float32))
    want = reference(np.asarray(x.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)))
    scale = np.abs(np.asarray(x.astype(jnp.float32))) @ np.abs(np.asarray(w.astype(jnp.float32)))
    if x_dtype == jnp.float32:
        np.testing.assert_array_less(np.abs(got - want), 1e-5 * scale + 1e-6)
    else:  # f32 sum, then one rounding to bf16: within one bf16 step of the exact value
        rounded = want.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_less(np.abs(got - rounded), np.abs(want) * 2.0**-7 + 1e-5 * scale + 1e-6)


def test_nan_and_inf_propagate():
    x = jnp.asarray([[1.0, jnp.nan, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], jnp.float32)
    w = jnp.ones((4, 20), jnp.bfloat16).at[3, 5].set(jnp.inf)
    y = np.asarray(matvec.matvec(x, w))
    assert np.isnan(y[0]).all() and np.isinf(y[1, 5]) and np.isfinite(np.delete(y[1], 5)).all()


def lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_identical_calls_give_identical_bits_while_the_cores_are_busy():
    """Which worker sums which slab varies when a thread competes for the cores; summed per
    worker, 9 of 200 such calls differed in their last bits (and greedy tokens of a random 7B
    model changed between two identical `sample` calls). Slabs are now added in slab order."""
    import threading

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((4096, 4096), np.float32), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((1, 4096), np.float32))
    f = jax.jit(matvec.matvec)
    first = np.asarray(f(x, w))
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            sum(i * i for i in range(10_000))

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        outputs = {np.asarray(f(x, w)).tobytes() for _ in range(100)}
    finally:
        stop.set()
        thread.join()
    assert outputs == {first.tobytes()}


def test_dot_takes_the_kernel_only_when_asked_for_few_rows():
    k, n = 8, matvec.MIN_F32_BYTES // 32  # an f32 [k, n] weight of MIN_F32_BYTES
    w16, w32, f16 = (jnp.ones((k, n), d) for d in (jnp.bfloat16, jnp.float32, jnp.float16))
    x = lambda rows, dtype=jnp.float32: jnp.ones((rows, k), dtype)

    def in_decode(x, w):
        return dots.dot(x, w, x.dtype, use_kernel=True)

    assert matvec.TARGET in lowered(in_decode, x(1), w16)
    assert matvec.TARGET in lowered(in_decode, x(1), w32)
    assert matvec.TARGET in lowered(in_decode, x(1, jnp.bfloat16), w16)
    assert matvec.TARGET in lowered(in_decode, x(matvec.MAX_ROWS), w16)
    assert matvec.TARGET not in lowered(in_decode, x(matvec.MAX_ROWS + 1), w16)
    assert matvec.TARGET not in lowered(in_decode, x(1, jnp.bfloat16), w32)  # XLA rounds w first
    assert matvec.TARGET not in lowered(in_decode, x(1, jnp.float16), f16)
    assert matvec.TARGET not in lowered(in_decode, x(1), w32[:, :-1])  # small f32: XLA's dot
    assert matvec.TARGET in lowered(in_decode, x(1), w16[:, :8])  # bf16: XLA's is slow at any size
    assert matvec.TARGET not in lowered(lambda x, w: dots.dot(x, w, jnp.float32), x(1), w16)
    np.testing.assert_array_equal(jax.jit(in_decode)(x(2), w16), np.full((2, n), 8.0))


def test_bf16_decode_step_with_the_kernel_matches_xla():
    """One decode step of a tiny bf16 LLaMA (every Dense through the kernel) against XLA's dots."""
    config = model_config("tiny")
    config = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    lm = SafeVLM(config, rngs=nnx.Rngs(0)).language_model
    t = config.text
    batch, slots = 2, 8
    ids = jnp.asarray([[5], [9]], jnp.int32)

    def step(use_kernel):
        cache = KVCache.init(t.num_hidden_layers, batch, t.num_key_value_heads, slots, t.head_dim,
                             jnp.float32)
        positions, mask = jnp.zeros((batch, 1), jnp.int32), jnp.ones((batch, 1), jnp.int32)
        model = decode_mode(nnx.clone(lm)) if use_kernel else lm
        return model(model.embed(ids), positions, mask, cache)[0]

    with_kernel = jax.jit(lambda: step(True))
    assert matvec.TARGET in with_kernel.lower().as_text()
    got, want = with_kernel(), jax.jit(lambda: step(False))()
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=0.05 * float(jnp.abs(want).max()))


def test_portable_path_matches_too():
    """The auto-vectorized path (CPUs without AVX-512), forced by its environment switch."""
    env = dict(os.environ, SAFEVLM_JAX_PORTABLE_MATVEC="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "matches_f32_accumulation or nan_and_inf"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
