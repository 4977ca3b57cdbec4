"""LLaMA-2 / Vicuna decoder (HF `LlamaForCausalLM` names), with LoRA, GQA and a KV cache.

Parameter tree (unscanned; with `scan_layers` `layers` is one module whose leaves have a
leading [num_layers] axis):
  model/embed_tokens/embedding                [vocab, embed]
  model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel (+ lora/{lora_a,lora_b})
  model/layers/<i>/mlp/{gate,up,down}_proj/kernel (+ lora/...)
  model/layers/<i>/{input,post_attention}_layernorm/scale
  model/norm/scale
  lm_head/kernel                              [embed, vocab] (absent when tied)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safevlm_jax import sharding
from safevlm_jax.config import LoRAConfig, TextConfig
from safevlm_jax.models import attention, kv_cache, layers, stack
from safevlm_jax.models.kv_cache import KVCache

INIT_STD = 0.02  # HF `initializer_range`


@functools.lru_cache(maxsize=8)
def _angles(theta: float, head_dim: int, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / theta ** (np.arange(head_dim // 2, dtype=np.float32) * 2 / head_dim)
    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)
    return np.cos(freqs), np.sin(freqs)


def rope_tables(positions: jax.Array, theta: float, head_dim: int,
                max_positions: int) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, Dh/2] f32 of the rotary angles at `positions` [B, T] int (HF's
    `position_embeddings`), looked up in constant tables of `max_positions` rows (NaN past
    them). A lookup fuses into each layer's rope as a load; cos and sin computed in the
    graph were evaluated again for every head and layer (docs/performance.md)."""
    return tuple(jnp.take(jnp.asarray(t), positions, axis=0, mode="fill", fill_value=jnp.nan)
                 for t in _angles(theta, head_dim, max_positions))


def rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding, HF rotate-half layout: x [B, <head axes>, T, Dh] with `rope_tables`.
    Applied after the heads-major transpose: on [B, T, heads, Dh] XLA:CPU fused the
    transpose into rope's backward, an element-by-element gather."""
    cos, sin = (c.reshape(c.shape[0], *(1,) * (x.ndim - 3), *c.shape[1:]) for c in tables)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention; softmax in f32."""

    def __init__(self, cfg: TextConfig, lora: LoRAConfig, *, attention: str = "auto", dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention = attention  # models/attention.py IMPLEMENTATIONS
        h, kv, dh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size

        def dense(name, n_in, n_out, axes):
            rank = lora.rank if name in lora.targets else 0
            return layers.Dense(n_in, n_out, axes, use_bias=cfg.attention_bias, dtype=dtype,
                                param_dtype=param_dtype, init_std=INIT_STD, lora_rank=rank,
                                lora_alpha=lora.alpha, lora_dropout=lora.dropout, rngs=rngs)

        self.q_proj = dense("q_proj", d, h * dh, ("embed", "heads"))
        self.k_proj = dense("k_proj", d, kv * dh, ("embed", "kv"))
        self.v_proj = dense("v_proj", d, kv * dh, ("embed", "kv"))
        self.o_proj = dense("o_proj", h * dh, d, ("heads", "embed"))

    def __call__(self, x, rotary, mask, cached=None):
        """x [B, T, D]; rotary: `rope_tables` of the T positions; cached: None, or this
        layer's cache buffers and each row's slot to write, (k, v [B', KVH, S', Dh], index
        [B]; B' >= B rows and S' >= S slots: a view reads the first B rows and S slots).
        mask: without a cache, valid [B, T] bool (the real tokens; attention is causal over
        them, `models.attention.self_attention`); with one, [B, 1, 1, T, S] bool (True =
        attend) over the S cache slots once this call's tokens are written at each row's
        index..index+T-1 (`kv_cache.attend`: a row's index may follow a reused prefix).
        Returns (out [B, T, D], the updated (k, v) buffers or None).
        """
        c = self.cfg
        b, t, _ = x.shape
        g = c.num_attention_heads // c.num_key_value_heads
        q = self.q_proj(x).reshape(b, t, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        q = q.reshape(b, t, c.num_key_value_heads, g, c.head_dim).transpose(0, 2, 3, 1, 4)
        q = rope(q, rotary) * jnp.asarray(c.head_dim**-0.5, q.dtype)
        k = rope(k.transpose(0, 2, 1, 3), rotary)  # [B, KVH, T, Dh]
        v = v.transpose(0, 2, 1, 3)
        written = None
        if cached is None:  # causal self-attention over these tokens (models/attention.py)
            out = attention.self_attention(q.reshape(b, -1, t, c.head_dim), k, v, mask, causal=True,
                                           implementation=self.attention)
        else:  # write first, then read the buffers (a view: the corner its mask covers): no copy
            written = kv_cache.update(cached, k, v)
            out = kv_cache.attend(q, *written, mask)
        out = out.reshape(b, -1, t, c.head_dim).transpose(0, 2, 1, 3).reshape(b, t, -1)
        out = sharding.constrain(out, ("batch", "length", "act_heads"))
        return self.o_proj(out), written


class LlamaMLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig, lora: LoRAConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.act = layers.activation(cfg.hidden_act)

        def dense(name, n_in, n_out, axes):
            rank = lora.rank if name in lora.targets else 0
            return layers.Dense(n_in, n_out, axes, use_bias=cfg.mlp_bias, dtype=dtype,
                                param_dtype=param_dtype, init_std=INIT_STD, lora_rank=rank,
                                lora_alpha=lora.alpha, lora_dropout=lora.dropout, rngs=rngs)

        d, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = dense("gate_proj", d, m, ("embed", "mlp"))
        self.up_proj = dense("up_proj", d, m, ("embed", "mlp"))
        self.down_proj = dense("down_proj", m, d, ("mlp", "embed"))

    def __call__(self, x):
        h = self.act(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(sharding.constrain(h, ("batch", "length", "mlp")))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: TextConfig, lora: LoRAConfig, *, attention: str = "auto", dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = LlamaAttention(cfg, lora, attention=attention, **kw)
        self.mlp = LlamaMLP(cfg, lora, **kw)
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                                       param_dtype=param_dtype)

    def __call__(self, x, rotary, mask, cached=None):
        h, kv = self.self_attn(self.input_layernorm(x), rotary, mask, cached)
        x = sharding.constrain(x + h, ("batch", "length", "embed"))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return sharding.constrain(x, ("batch", "length", "embed")), kv


class LlamaModel(nnx.Module):
    """embed_tokens, layers, norm (HF `LlamaModel`)."""

    def __init__(self, cfg: TextConfig, lora: LoRAConfig, *, scan_layers: bool, attention: str = "auto",
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)
        self.layers = stack.make_layers(
            lambda r: LlamaDecoderLayer(cfg, lora, attention=attention, dtype=dtype, param_dtype=param_dtype,
                                        rngs=r),
            cfg.num_hidden_layers, scan_layers, rngs)
        self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)


class LlamaForCausalLM(nnx.Module):
    """The decoder plus LM head. LoRA (when `lora.rank > 0`) on the Dense layers named in
    `lora.targets`, never on `lm_head`. `attention`: the implementation of the causal
    self-attention (`models.attention.IMPLEMENTATIONS`)."""

    def __init__(self, text: TextConfig, lora: LoRAConfig, *, scan_layers: bool = False,
                 remat_policy: str = "none", attention: str = "auto", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = text
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy
        self.dtype = dtype
        self.model = LlamaModel(text, lora, scan_layers=scan_layers, attention=attention, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (None if text.tie_word_embeddings else
                        layers.Dense(text.hidden_size, text.vocab_size, ("embed", "vocab"),
                                     use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                     init_std=INIT_STD, rngs=rngs))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, T] int -> [B, T, D] in the compute dtype."""
        return sharding.constrain(self.model.embed_tokens(input_ids), ("batch", "length", "embed"))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache of `max_len` slots (dtype defaults to the compute dtype)."""
        c = self.config
        return KVCache.init(c.num_hidden_layers, batch, c.num_key_value_heads, max_len,
                            c.head_dim, dtype or self.dtype)

    def head(self, x: jax.Array) -> jax.Array:
        """Final normed hidden states [B, T, D] -> logits [B, T, vocab] float32 (the LM head,
        or the tied embedding table)."""
        logits = self.model.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return sharding.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                 cache: KVCache | None = None, last_only: bool = False,
                 logits_at: jax.Array | None = None, lm_head: bool = True) -> tuple[jax.Array, KVCache | None]:
        """inputs_embeds [B, T, D]; positions [B, T] int32 (left padding: cumsum(mask) - 1,
        clipped at 0); attention_mask [B, T] (1 real, 0 padding). `last_only`: logits of the
        last position only ([B, 1, vocab]; a prefill needs no more, and the LM head over every
        prompt position costs T x d x vocab); `logits_at` [B] int: of that position of each
        row instead ([B, 1, vocab]; the last real token of a right-padded prompt).

        Without a cache, attention is causal over these T tokens. With one, the T tokens go to
        each row's slots `cache.index`.. and attend to every valid slot written before them
        and to themselves; a row's index advances by its real tokens. Returns (logits [B, T,
        vocab] float32, updated cache or None); with `lm_head=False`, the final normed hidden
        states [B, T, D] in place of the logits (`head` makes them logits: a train step does,
        a chunk of positions at a time).
        """
        t = inputs_embeds.shape[1]
        valid = attention_mask.astype(jnp.bool_)
        per_layer = None if cache is None else [(k, v, cache.index) for k, v in zip(cache.k, cache.v)]
        if cache is not None:  # query j sits in slot index + j: real slots up to its own
            slot_valid, mask = cache.write_mask(valid)  # [B, S], [B, T, S]
            mask = mask[:, None, None]
        else:
            mask = valid  # causal self-attention over these tokens (models/attention.py)
        c = self.config  # tables reach every position this call can hold, as HF's rope does
        rotary = rope_tables(positions, c.rope_theta, c.head_dim,
                             max(c.max_position_embeddings, t + (0 if cache is None else cache.max_len)))

        def body(layer, x, cached):
            return layer(x, rotary, mask, cached)

        x = sharding.constrain(inputs_embeds.astype(self.dtype), ("batch", "length", "embed"))
        x, new_kv = stack.apply_layers(self.model.layers, x, per_layer, body,
                                       scan=self.scan_layers, remat_policy=self.remat_policy)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
        elif last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        logits = self.head(x) if lm_head else x
        if cache is not None:  # a row advances by its real tokens: padding and idle rows stay
            cache = KVCache(k=tuple(k for k, _ in new_kv), v=tuple(v for _, v in new_kv),
                            mask=slot_valid, index=cache.index + valid.sum(-1, dtype=jnp.int32))
        return logits, cache
