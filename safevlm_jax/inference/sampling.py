"""Sampling rules: logits [B, V] -> token ids [B] (greedy, temperature, top-k, top-p).

They are pytrees, so their numbers are traced (no recompile) and only their kind is static.
`PerRow` gives every row its own rule and key (continuous batching: one program for any mix
of requests).
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
        masked = _nucleus(logits, jnp.sort(logits, axis=-1)[:, ::-1], self.p)
        return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


def _nucleus(logits: jax.Array, ordered: jax.Array, p) -> jax.Array:
    """logits [B, V] with -inf outside the smallest set of tokens whose probability reaches p
    (scalar or [B, 1]); `ordered`: the logits sorted in descending order."""
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    kept = jnp.where(before < p, ordered, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PerRow:
    """A rule per row, all traced [B] arrays: temperature (0 = greedy), then top_k (0 = off)
    and top_p (1 = off) on what is left, as HF applies them. Called with one key per row
    (keys [B]), so a row's draw does not depend on the rows beside it. Sorting the
    vocabulary and drawing run only when some row needs them (`lax.cond`)."""

    temperature: jax.Array  # [B] f32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] f32

    def __call__(self, logits: jax.Array, keys: jax.Array) -> jax.Array:
        """logits [B, V] f32, keys [B] -> token ids [B] int32."""
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        sampled = self.temperature > 0
        filtered = sampled & ((self.top_k > 0) | (self.top_p < 1))

        def draw(logits):
            logits = logits / jnp.where(sampled, self.temperature, 1.0)[:, None]
            logits = jax.lax.cond(jnp.any(filtered), self._filter, lambda x: x, logits)
            return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)

        drawn = jax.lax.cond(jnp.any(sampled), draw, lambda _: greedy, logits)
        return jnp.where(sampled, drawn, greedy)

    def _filter(self, logits: jax.Array) -> jax.Array:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        k = jnp.clip(self.top_k, 1, logits.shape[-1])[:, None]
        kth = jnp.take_along_axis(ordered, k - 1, axis=-1)  # ties with the k-th stay, as in HF
        off = self.top_k[:, None] <= 0
        logits = jnp.where(off | (logits >= kth), logits, -jnp.inf)
        ordered = jnp.where(off | (ordered >= kth), ordered, -jnp.inf)
        return jnp.where(self.top_p[:, None] < 1, _nucleus(logits, ordered, self.top_p[:, None]), logits)


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
