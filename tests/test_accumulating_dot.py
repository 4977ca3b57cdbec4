"""`xla_dot` (safevlm_jax/models/dot.py): 16-bit dots on CPU accumulate in f32, forward and
backward, to the same values as an f64 reference rounded once; the compiled step keeps every
dot on 16-bit operands (XLA:CPU runs f32-converted ones 3-4x slower); f32 is a plain dot."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from safevlm_jax.models.dot import xla_dot

BF16 = ml_dtypes.bfloat16


def rounded(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).astype(BF16).astype(np.float64)


def assert_bf16_close(got, want):
    """Within one bf16 ulp of the f64 reference rounded (accumulation order may differ)."""
    got, want = np.asarray(got).astype(np.float64), rounded(want)
    np.testing.assert_allclose(got, want, rtol=2.0 ** -7, atol=1e-6)


@pytest.mark.parametrize("w_axis", [0, 1])
@pytest.mark.parametrize("lead", [(6,), (2, 3)])
def test_forward_and_gradients_match_f64_rounded_once(lead, w_axis):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(*lead, 40)).astype(BF16)
    w = rng.normal(size=(40, 24)).astype(np.float32)  # an f32 master weight used in bf16
    stored = w if w_axis == 0 else w.T  # [K, N], or [N, K] as a tied embedding table
    g = rng.normal(size=(*lead, 24)).astype(BF16)
    y, vjp = jax.vjp(lambda x, w: xla_dot(x, w, jnp.bfloat16, w_axis), jnp.asarray(x), jnp.asarray(stored))
    assert y.dtype == jnp.bfloat16
    dx, dw = vjp(jnp.asarray(g))
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32 and dw.shape == stored.shape
    x64, w64, g64 = x.astype(np.float64), rounded(w), g.astype(np.float64)
    assert_bf16_close(y, x64 @ w64)
    assert_bf16_close(dx, g64 @ w64.T)
    flat = lambda a: a.reshape(-1, a.shape[-1])
    dw_want = flat(x64).T @ flat(g64)  # rounded to bf16, then cast to w's f32
    assert_bf16_close(dw, dw_want if w_axis == 0 else dw_want.T)


def compiled_dots(fn, *args) -> list[tuple[str, str]]:
    """(lhs dtype, rhs dtype) of every dot in the optimised CPU program of `fn`."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    dtypes = dict(re.findall(r"%?([\w.]+) = (\w+)\[", text))  # instructions
    dtypes.update(re.findall(r"([\w.]+): (\w+)\[", text))  # computation parameters
    return [(dtypes[a], dtypes[b]) for a, b in re.findall(r" dot\(%([\w.]+), %([\w.]+)\)", text)]


@pytest.mark.parametrize("w2_axis", [0, 1])
def test_backward_dots_stay_bf16_on_cpu(w2_axis):
    """A 2-layer bf16 MLP over f32 master weights, gradient to the input only (the frozen
    weights of stage 1 and 2): forward and input-gradient dots all take bf16 operands, also
    when the second weight is stored [out, in] (a tied LM head: `Embed.attend`)."""
    x = jnp.ones((64, 128), jnp.float32)
    w1 = jnp.ones((128, 256), jnp.float32)
    w2 = jnp.ones((256, 128) if w2_axis == 0 else (128, 256), jnp.float32)

    def loss(x, w1, w2):
        h = jax.nn.silu(xla_dot(x.astype(jnp.bfloat16), w1, jnp.bfloat16))
        return jnp.square(xla_dot(h, w2, jnp.bfloat16, w2_axis).astype(jnp.float32)).sum()

    dots = compiled_dots(jax.grad(loss), x, w1, w2)
    assert len(dots) == 4, dots  # two forward, two input gradients (no weight gradient)
    assert all(d == ("bf16", "bf16") for d in dots), dots


def test_f32_is_a_plain_dot():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    text = jax.jit(lambda x, w: xla_dot(x, w, jnp.float32)).lower(x, w).as_text()
    assert "stablehlo.dot_general" in text and "case" not in text and "custom_call" not in text
