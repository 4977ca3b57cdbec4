"""Sampling rules: logits [B, V] -> token ids [B] (greedy, temperature, top-k, top-p).

They are pytrees, so their numbers are traced (no recompile) and only their kind is static.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Greedy:
    """argmax of the logits."""

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """logits [B, V] f32 -> token ids [B] int32."""
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Temperature:
    """Sample from softmax(logits / temperature)."""

    temperature: float = 1.0

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return jax.random.categorical(key, logits / self.temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["temperature"], meta_fields=["k"])
@dataclasses.dataclass(frozen=True)
class TopK:
    """Sample among the k most likely tokens (k is static: it sets a shape)."""

    k: int = 40
    temperature: float = 1.0

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        values, ids = jax.lax.top_k(logits, self.k)
        choice = jax.random.categorical(key, values / self.temperature, axis=-1)
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: the smallest set of tokens whose probability reaches p (always >= 1)."""

    p: float = 0.9
    temperature: float = 1.0

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        logits = logits / self.temperature
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        kept = jnp.where(before < self.p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        masked = jnp.where(logits >= threshold, logits, -jnp.inf)
        return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """From CLI-style numbers: temperature 0 is greedy; top_k > 0 or top_p < 1 pick one filter."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got "
                         f"{temperature}, {top_k}, {top_p}")
    if top_k and top_p < 1:
        raise ValueError("choose one of top_k and top_p, not both")
    if temperature == 0:
        return Greedy()
    if top_k:
        return TopK(top_k, temperature)
    if top_p < 1:
        return TopP(top_p, temperature)
    return Temperature(temperature)
