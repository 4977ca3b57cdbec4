"""Matrix-vector products for decode on CPU through the XLA FFI kernel in matvec.cc.

Decode multiplies a few rows by every weight matrix, so its speed is the rate at which the
weights stream from memory. XLA:CPU's bf16 dot with few rows is much slower than its f32
one, and its f32 product streams below what the kernel's prefetching reaches
(docs/performance.md). `matvec` computes [rows <= MAX_ROWS, in] x [in, out] with f32
accumulation; `safevlm_jax.models.dot.dot` decides when a product takes it.

The kernel is a shared library that `pip install` builds next to this file (setup.py).
"""

import ctypes
import functools
import importlib.machinery
import pathlib

import jax
from absl import logging

TARGET = "safevlm_matvec"
MAX_ROWS = 16  # rows (batch x tokens) up to which a product is weight-streaming bound
# f32 weights smaller than this stay with XLA, as fast there on cache-resident matrices and
# without a custom call's overhead (docs/performance.md)
MIN_F32_BYTES = 2 << 20


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
                        "decode on CPU uses XLA's dots (bf16 weights: about half the speed)")
        return False
    lib = ctypes.CDLL(str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SafeVlmMatvec), platform="cpu")
    return True


def matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] f32|bf16, w [K, N] f32|bf16 -> [M, N] in x's dtype, f32 accumulation (the kernel)."""
    if not available():
        raise RuntimeError("safevlm_jax's CPU kernel is not built: install the package with pip")
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, w)
