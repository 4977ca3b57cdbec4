"""Safety tokens and safety head: one cross-attention read-out, two classifiers
(docs/safety_modules.md).

    query = text embedding of the first real token [B, d]
    keys = values = concat(safety_tokens_head [T_s, d] broadcast, safety projector out [B, Q, d])
    level_logits [B, 4], type_logits [B, 7] = safety_head / other_head (cross_attention(...))

The authors attend from every text position and keep position 0; one query's output depends
on that query alone, so only the first real token is passed (a left-padded batch then gives
each row's own verdict). Names follow the authors' `safe_part.*` keys: `cross_attention`
(`torch.nn.MultiheadAttention`; its packed `in_proj_weight` [3d, d] is split into
`q_proj`/`k_proj`/`v_proj` here), `safety_head`, `other_head`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from safevlm_jax import sharding
from safevlm_jax.config import ModelConfig
from safevlm_jax.models.layers import Dense
from safevlm_jax.models.params import normal_init, param


def init_safety_tokens(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Param:
    """One learned safety-token array [num_tokens, d], N(0, 0.02), axes (None, "embed").

    SafeVLM holds two: `safety_tokens_head` (authors' `safety_query_tokens`, stored [1, T, d])
    and `safety_tokens_llm` (`safety_query_tokens_2`).
    """
    shape = (config.safety.num_tokens, config.text.hidden_size)
    return param(normal_init(rngs, shape, config.weights_dtype, 0.02), (None, "embed"))


def safety_keys(safety_tokens_head: jax.Array, projected: jax.Array) -> jax.Array:
    """Keys/values of the safety head: [T_s, d] tokens and [B, Q, d] safety projector output
    -> [B, T_s + Q, d] (tokens first), in the projector output's dtype."""
    b = projected.shape[0]
    tokens = jnp.broadcast_to(safety_tokens_head.astype(projected.dtype)[None],
                              (b,) + safety_tokens_head.shape)
    keys = jnp.concatenate([tokens, projected], axis=1)
    return sharding.constrain(keys, ("batch", "length", "embed"))


def first_token(embeds: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The embedding at each row's first real position (BOS after left padding).

    embeds [B, T, d], attention_mask [B, T] (1/True = real token) -> [B, d].
    """
    index = jnp.argmax(attention_mask.astype(bool), axis=1)
    return jnp.take_along_axis(embeds, index[:, None, None], axis=1)[:, 0]


class MultiheadAttention(nnx.Module):
    """`torch.nn.MultiheadAttention(d, heads)` for a single query position, no mask.

    q/k/v/out projections [d, d] with bias; softmax(q·kᵀ/√head_dim) in f32.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if embed_dim % num_heads:
            raise ValueError(f"safety head: d={embed_dim} is not a multiple of heads={num_heads}")
        self.num_heads = num_heads
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(embed_dim, embed_dim, ("embed", "heads"), **kw)
        self.k_proj = Dense(embed_dim, embed_dim, ("embed", "heads"), **kw)
        self.v_proj = Dense(embed_dim, embed_dim, ("embed", "heads"), **kw)
        self.out_proj = Dense(embed_dim, embed_dim, ("heads", "embed"), **kw)

    def __call__(self, query: jax.Array, keys: jax.Array) -> jax.Array:
        """query [B, d], keys = values [B, S, d] -> [B, d] in `dtype`."""
        b, s, d = keys.shape
        h = self.num_heads
        q = self.q_proj(query).reshape(b, h, d // h)
        k = self.k_proj(keys).reshape(b, s, h, d // h)
        v = self.v_proj(keys).reshape(b, s, h, d // h)
        scores = jnp.einsum("bhd,bshd->bhs", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores / math.sqrt(d // h), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhs,bshd->bhd", probs, v).reshape(b, d)
        return self.out_proj(out)


class SafetyHead(nnx.Module):
    """Risk verdict from one query embedding and the safety keys.

    `cross_attention` (config.safety.head_num_heads heads over d), `safety_head` [d, num_levels]
    (risk level), `other_head` [d, num_types] (risk type). The classifiers run in f32.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        s, d = config.safety, config.text.hidden_size
        self.cross_attention = MultiheadAttention(d, s.head_num_heads, dtype=config.compute_dtype,
                                                  param_dtype=config.weights_dtype, rngs=rngs)
        kw = dict(dtype=jnp.float32, param_dtype=config.weights_dtype, rngs=rngs)
        self.safety_head = Dense(d, s.num_levels, ("embed", None), **kw)
        self.other_head = Dense(d, s.num_types, ("embed", None), **kw)

    def __call__(self, query: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        """query [B, d], keys [B, S, d] -> (level_logits [B, num_levels], type_logits
        [B, num_types]), both f32."""
        x = self.cross_attention(query, keys)
        return self.safety_head(x), self.other_head(x)
