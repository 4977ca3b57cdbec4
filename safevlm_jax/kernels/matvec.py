"""Matrix-vector products for decode on CPU through the XLA FFI kernel in matvec.cc.

Decode multiplies a few rows by every weight matrix, so its speed is the rate at which the
weights stream from memory. XLA:CPU runs a bf16 dot with few rows about 8x slower than the
f32 one (bf16 weights decoded no faster than f32 weights although they are half the bytes),
and its f32 product streams ~10% below what the kernel's prefetching reaches. `dot` sends
[rows <= MAX_ROWS, in] x [in, out] products with bf16 weights, or f32 weights of at least
MIN_F32_BYTES, to the kernel while `decode_matvecs()` is active (the sampler's decode step)
and the program runs on CPU; any other backend, shape or dtype, or a missing build, takes
`xla_dot`.

The kernel is a shared library that `pip install` builds next to this file (setup.py).

`xla_dot` is the dot every other product takes (prefill, training): on CPU it accumulates
16-bit inputs in f32 explicitly, forward and backward, which XLA:CPU runs 3-4x faster than
its bf16 -> bf16 dots.
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

TARGET = "safevlm_matvec"
MAX_ROWS = 16  # rows (batch x tokens) up to which a product is weight-streaming bound
# f32 weights smaller than this stay with XLA, as fast there on cache-resident matrices and
# without a custom call's overhead (through the kernel the tiny model decoded at half speed)
MIN_F32_BYTES = 2 << 20
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
                        "decode on CPU uses XLA's dots (bf16 weights: about half the speed)")
        return False
    lib = ctypes.CDLL(str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SafeVlmMatvec), platform="cpu")
    return True


@contextlib.contextmanager
def decode_matvecs():
    """While tracing inside this context, eligible `dot`s use the CPU kernel."""
    token = _ENABLED.set(True)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] f32|bf16, w [K, N] f32|bf16 -> [M, N] in x's dtype, f32 accumulation (the kernel)."""
    if not available():
        raise RuntimeError("safevlm_jax's CPU kernel is not built: install the package with pip")
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, w)


def _contract(x: jax.Array, w: jax.Array, w_axis: int, **kwargs) -> jax.Array:
    """x [..., K] contracted with axis `w_axis` (K) of the 2-D w: [..., N]."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (w_axis,)), ((), ())), **kwargs)


def _accumulating_dot(x: jax.Array, w: jax.Array, w_axis: int) -> jax.Array:
    """`_contract` of 16-bit floats of one dtype, accumulated in f32, in x's dtype."""
    return _contract(x, w, w_axis, preferred_element_type=jnp.float32).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot16(x: jax.Array, w: jax.Array, w_axis: int) -> jax.Array:
    """`_accumulating_dot` whose gradients are such dots too (autodiff would feed the f32
    cotangent of the accumulator to f32 x bf16 dots, which XLA:CPU runs as f32 dots)."""
    return _accumulating_dot(x, w, w_axis)


def _dot16_fwd(x, w, w_axis):
    return _accumulating_dot(x, w, w_axis), (x, w)


def _dot16_bwd(w_axis, residuals, g):
    x, w = residuals
    lead = tuple(range(x.ndim - 1))
    dw = jnp.tensordot(x, g, axes=(lead, lead), preferred_element_type=jnp.float32)  # [K, N]
    # g over N against w's other axis, never `w.T`: XLA:CPU turns dots of a transposed,
    # converted weight into f32 dots
    return _accumulating_dot(g, w, 1 - w_axis), (dw if w_axis == 0 else dw.T).astype(w.dtype)


_dot16.defvjp(_dot16_fwd, _dot16_bwd)


def xla_dot(x: jax.Array, w: jax.Array, dtype, w_axis: int = 0) -> jax.Array:
    """x [..., K] @ w.astype(dtype) for x already in `dtype`, contracting w's axis `w_axis`
    (0: w [K, N]; 1: w [N, K], as a tied embedding table, without transposing it). 16-bit
    floats on CPU accumulate in f32 explicitly, forward and backward (`_dot16`): XLA:CPU runs
    such dots 3-4x faster than its bf16 -> bf16 ones (~1 TFLOP/s against ~250 GFLOP/s here,
    with AMX), and turns dots of a transposed, converted weight into f32 dots. GPUs and TPUs
    keep their native bf16 dots, which accumulate in f32 anyway."""
    w = w.astype(dtype)
    plain = functools.partial(_contract, w_axis=w_axis)
    if jnp.dtype(dtype).itemsize != 2:
        return plain(x, w)
    return jax.lax.platform_dependent(x, w, cpu=functools.partial(_dot16, w_axis=w_axis), default=plain)


def dot(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """x [M, K] @ w [K, N] computed in `dtype` (x already in it): `xla_dot`, or the kernel
    (same math, f32 accumulation) on CPU for few rows inside `decode_matvecs()`."""
    default = functools.partial(xla_dot, dtype=dtype)
    exact_cast = jnp.promote_types(w.dtype, dtype) == dtype  # f32 w in bf16 would round first
    big_enough = w.dtype == jnp.bfloat16 or w.size * w.dtype.itemsize >= MIN_F32_BYTES
    if not (_ENABLED.get() and x.shape[0] <= MAX_ROWS and exact_cast and big_enough
            and x.dtype == dtype and {x.dtype, w.dtype} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}
            and available()):
        return default(x, w)
    return jax.lax.platform_dependent(x, w, cpu=matvec, default=default)
