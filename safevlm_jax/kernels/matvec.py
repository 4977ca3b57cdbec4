"""bf16-weight matrix-vector products on CPU through the XLA FFI kernel in matvec.cc.

XLA:CPU runs a bf16 dot with few rows about 8x slower than the f32 one, so decoding with
bf16 weights on CPU was no faster than with f32 weights although it reads half the bytes.
`dot` sends such products ([rows <= MAX_ROWS, in] x bf16 [in, out]) to the kernel while
`decode_matvecs()` is active (the sampler's decode step) and the program runs on CPU; any
other backend, shape or dtype, or a missing build, takes `jnp.dot`.

The kernel is a shared library built by `pip install` (setup.py) next to this file.
"""

import contextlib
import contextvars
import ctypes
import functools
import importlib.machinery
import pathlib

import jax
import jax.numpy as jnp
from absl import logging

TARGET = "safevlm_bf16_matvec"
MAX_ROWS = 16  # rows (batch x tokens) up to which a product is weight-streaming bound
_ENABLED = contextvars.ContextVar("safevlm_matvec", default=False)


def library_path() -> pathlib.Path | None:
    """The built kernel library next to this file, or None if the package was not built."""
    here = pathlib.Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"_matvec{suffix}").exists():
            return here / f"_matvec{suffix}"
    return None


@functools.cache
def available() -> bool:
    """Loads the library and registers its FFI target for CPU (once)."""
    path = library_path()
    if path is None:
        logging.warning("safevlm_jax's CPU kernel is not built (install the package with pip); "
                        "bf16 decode on CPU uses XLA's slower bf16 dot")
        return False
    lib = ctypes.CDLL(str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SafeVlmBf16Matvec), platform="cpu")
    return True


@contextlib.contextmanager
def decode_matvecs():
    """While tracing inside this context, eligible `dot`s use the CPU kernel."""
    token = _ENABLED.set(True)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def bf16_matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] f32|bf16, w [K, N] bf16 -> [M, N] in x's dtype, f32 accumulation (the kernel)."""
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, w)


def dot(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """x [M, K] @ w [K, N] computed in `dtype` (x already in it): jnp.dot(x, w.astype(dtype)),
    or the kernel (same math) on CPU for bf16 w and few rows inside `decode_matvecs()`."""
    default = lambda x, w: jnp.dot(x, w.astype(dtype))
    if not (_ENABLED.get() and w.dtype == jnp.bfloat16 and x.shape[0] <= MAX_ROWS
            and x.dtype in (jnp.float32, jnp.bfloat16) and available()):
        return default(x, w)
    return jax.lax.platform_dependent(x, w, cpu=bf16_matvec, default=default)
