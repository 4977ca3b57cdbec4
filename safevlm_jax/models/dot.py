"""`xla_dot`: the dot every model product takes (prefill, vision tower, training).

On CPU it accumulates 16-bit inputs in f32 explicitly, forward and backward, which XLA:CPU
runs faster than its bf16 -> bf16 dots (docs/performance.md); other backends keep their
native dots.
"""

import functools

import jax
import jax.numpy as jnp

from safevlm_jax.kernels import matvec



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
    such dots several times faster than its bf16 -> bf16 ones, and turns dots of a
    transposed, converted weight into f32 dots (docs/performance.md). GPUs and TPUs keep
    their native bf16 dots, which accumulate in f32 anyway."""
    w = w.astype(dtype)
    plain = functools.partial(_contract, w_axis=w_axis)
    if jnp.dtype(dtype).itemsize != 2:
        return plain(x, w)
    return jax.lax.platform_dependent(x, w, cpu=functools.partial(_dot16, w_axis=w_axis), default=plain)


def dot(x: jax.Array, w: jax.Array, dtype, use_kernel: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] computed in `dtype` (x already in it): `xla_dot`, or, with
    `use_kernel` (decode programs: `Dense.decode_kernel`), the CPU matrix-vector kernel (same
    math, f32 accumulation) for few rows on CPU."""
    default = functools.partial(xla_dot, dtype=dtype)
    exact_cast = jnp.promote_types(w.dtype, dtype) == dtype  # f32 w in bf16 would round first
    big_enough = w.dtype == jnp.bfloat16 or w.size * w.dtype.itemsize >= matvec.MIN_F32_BYTES
    if not (use_kernel and x.shape[0] <= matvec.MAX_ROWS and exact_cast and big_enough
            and x.dtype == dtype and {x.dtype, w.dtype} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}
            and jax.default_backend() == "cpu" and matvec.available()):  # no CPU-kernel warning on GPU
        return default(x, w)
    return jax.lax.platform_dependent(x, w, cpu=matvec.matvec, default=default)
