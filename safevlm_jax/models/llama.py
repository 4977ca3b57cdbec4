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

import jax
import jax.numpy as jnp
from flax import nnx

from safevlm_jax import sharding
from safevlm_jax.config import LoRAConfig, TextConfig
from safevlm_jax.models import layers, stack
from safevlm_jax.models.kv_cache import KVCache, write

INIT_STD = 0.02  # HF `initializer_range`


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, HF rotate-half layout. x [B, T, heads, Dh], positions [B, T] int."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    cos, sin = jnp.cos(freqs)[:, :, None], jnp.sin(freqs)[:, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention; softmax in f32."""

    def __init__(self, cfg: TextConfig, lora: LoRAConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
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

    def __call__(self, x, positions, mask, cached=None):
        """x [B, T, D]; positions [B, T]; mask [B, 1, 1, T, S + T] bool (True = attend) over
        the S cached slots then these T tokens; cached: None (S = 0) or this layer's
        (k, v) [B, KVH, S, Dh] from the cache (read only: the caller writes the new entries).
        Returns (out [B, T, D], (k, v) [B, KVH, T, Dh] of these tokens).
        """
        c = self.cfg
        b, t, _ = x.shape
        g = c.num_attention_heads // c.num_key_value_heads
        q = self.q_proj(x).reshape(b, t, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        q = rope(q, positions, c.rope_theta) * jnp.asarray(c.head_dim**-0.5, q.dtype)
        k, v = rope(k, positions, c.rope_theta).transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        # query head h = kv head h // g, group member h % g (HF `repeat_kv` order). Group and
        # time share one axis (m = g*t): with two free axes XLA:CPU transposed the cache.
        q = q.reshape(b, t, c.num_key_value_heads, g, c.head_dim).transpose(0, 2, 3, 1, 4)
        q = q.reshape(b, c.num_key_value_heads, g * t, c.head_dim)
        scores = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=jnp.float32)
        if cached is not None:  # old slots and new tokens scored separately: no cache concat
            old = jnp.einsum("bkmd,bksd->bkms", q, cached[0].astype(q.dtype),
                             preferred_element_type=jnp.float32)
            scores = jnp.concatenate([old, scores], axis=-1)
        scores = scores.reshape(b, c.num_key_value_heads, g, t, -1)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)  # all-masked rows: uniform
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, c.num_key_value_heads, g * t, -1)
        out = jnp.einsum("bkms,bksd->bkmd", probs[..., -t:], v)
        if cached is not None:
            out = out + jnp.einsum("bkms,bksd->bkmd", probs[..., :-t], cached[1].astype(v.dtype))
        out = out.reshape(b, c.num_key_value_heads, g, t, c.head_dim).transpose(0, 3, 1, 2, 4)
        out = sharding.constrain(out.reshape(b, t, -1), ("batch", "length", "act_heads"))
        return self.o_proj(out), (k, v)


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

    def __init__(self, cfg: TextConfig, lora: LoRAConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = LlamaAttention(cfg, lora, **kw)
        self.mlp = LlamaMLP(cfg, lora, **kw)
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                                       param_dtype=param_dtype)

    def __call__(self, x, positions, mask, cached=None):
        h, kv = self.self_attn(self.input_layernorm(x), positions, mask, cached)
        x = sharding.constrain(x + h, ("batch", "length", "embed"))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return sharding.constrain(x, ("batch", "length", "embed")), kv


class LlamaModel(nnx.Module):
    """embed_tokens, layers, norm (HF `LlamaModel`)."""

    def __init__(self, cfg: TextConfig, lora: LoRAConfig, *, scan_layers: bool, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)
        self.layers = stack.make_layers(
            lambda r: LlamaDecoderLayer(cfg, lora, dtype=dtype, param_dtype=param_dtype, rngs=r),
            cfg.num_hidden_layers, scan_layers, rngs)
        self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)


class LlamaForCausalLM(nnx.Module):
    """The decoder plus LM head. LoRA (when `lora.rank > 0`) on the Dense layers named in
    `lora.targets`, never on `lm_head`."""

    def __init__(self, text: TextConfig, lora: LoRAConfig, *, scan_layers: bool = False,
                 remat_policy: str = "none", dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = text
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy
        self.dtype = dtype
        self.model = LlamaModel(text, lora, scan_layers=scan_layers, dtype=dtype,
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

    def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                 cache: KVCache | None = None,
                 last_only: bool = False) -> tuple[jax.Array, KVCache | None]:
        """inputs_embeds [B, T, D]; positions [B, T] int32 (left padding: cumsum(mask) - 1,
        clipped at 0); attention_mask [B, T] (1 real, 0 padding). `last_only`: logits of the
        last position only ([B, 1, vocab]; a prefill needs no more, and the LM head over every
        prompt position costs T x d x vocab).

        Without a cache, attention is causal over these T tokens. With one, the T tokens go to
        slots `cache.index`.. and attend to every valid slot written before them and to
        themselves. Returns (logits [B, T, vocab] float32, updated cache or None).
        """
        t = inputs_embeds.shape[1]
        valid = attention_mask.astype(jnp.bool_)
        mask = jnp.tril(jnp.ones((t, t), jnp.bool_))[None] & valid[:, None, :]  # [B, T, T]
        if cache is not None:  # old slots: written (before `index`) and real
            written = jnp.arange(cache.max_len) < cache.index
            old = jnp.broadcast_to((cache.mask & written)[:, None, :], (valid.shape[0], t, cache.max_len))
            mask = jnp.concatenate([old, mask], axis=-1)  # [B, T, S + T]
        mask = mask[:, None, None]

        def body(layer, x, cached):
            x, kv = layer(x, positions, mask, cached)
            return x, (None if cache is None else kv)

        x = sharding.constrain(inputs_embeds.astype(self.dtype), ("batch", "length", "embed"))
        x, new_kv = stack.apply_layers(
            self.model.layers, x, None if cache is None else list(zip(cache.k, cache.v)), body,
            scan=self.scan_layers, remat_policy=self.remat_policy)
        if cache is not None:  # orders every layer's cache read before the in-place write
            x, new_kv = jax.lax.optimization_barrier((x, new_kv))
        x = self.model.norm(x[:, -1:] if last_only else x)
        logits = self.model.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        logits = sharding.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        if cache is not None:
            cache = write(cache, new_kv, valid)
        return logits, cache
