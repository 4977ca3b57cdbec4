"""SafeVLM = LLaVA-1.5 (CLIP tower, projector, LLaMA) + safety projector, tokens and head.

Reads like the paper's Figure 1:

    features   = vision_tower(image)                      # [B, N, C], layer -2, CLS dropped
    image_emb  = [safety_tokens_llm ; projector(features)] # [B, 64 + N, d]
    embeds     = text embeddings with <image> positions replaced by image_emb
    logits     = language_model(embeds)
    level,type = safety_head(query = embedding of the first real token,
                             keys  = [safety_tokens_head ; safety_projector(features)])

With `use_safety=False` (or a config whose safety modules are disabled) it is plain LLaVA,
exactly as HF's `LlavaForConditionalGeneration` computes it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from safevlm_jax import sharding
from safevlm_jax.config import ModelConfig
from safevlm_jax.models.clip import CLIPVisionModel
from safevlm_jax.models.llama import LlamaForCausalLM
from safevlm_jax.models.projector import MultiModalProjector
from safevlm_jax.models.safety_head import SafetyHead, first_token, init_safety_tokens, safety_keys
from safevlm_jax.models.safety_projector import SafetyProjector


class SafeVLMOutput(NamedTuple):
    logits: jax.Array  # [B, T, vocab] float32; with lm_head=False the final hidden states [B, T, d]
    level_logits: jax.Array | None  # [B, num_levels] float32
    type_logits: jax.Array | None  # [B, num_types] float32
    cache: Any = None  # the language model's KV cache, when one was given


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Left-padding-safe positions [B, T]: 0 at the first real token of each row."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def merge_image_embeddings(text_embeds: jax.Array, input_ids: jax.Array, image_embeds: jax.Array,
                           image_token_index: int, first: jax.Array | None = None) -> jax.Array:
    """Puts image embeddings at the `<image>` positions, in order (HF's `masked_scatter`).

    text_embeds [B, T, d]; input_ids [B, T]; image_embeds [num_images, n_tok, d], consumed in
    row-major order of the image positions over the whole batch, or, given `first` [B], from
    row b's own flat index first[b] on (a prompt prefilled in chunks: a chunk may start inside
    its image). A gather, not a scatter, so it shards over the batch and has a cheap transpose.
    """
    is_image = input_ids == image_token_index
    flat = image_embeds.reshape(-1, image_embeds.shape[-1])
    if first is None:
        order = jnp.cumsum(is_image.reshape(-1).astype(jnp.int32)) - 1
    else:
        order = first[:, None] + jnp.cumsum(is_image.astype(jnp.int32), axis=1) - 1
    gathered = jnp.take(flat, jnp.clip(order.reshape(-1), 0, flat.shape[0] - 1), axis=0)
    gathered = gathered.reshape(text_embeds.shape).astype(text_embeds.dtype)
    return jnp.where(is_image[..., None], gathered, text_embeds)


class SafetyVerdict(nnx.Module):
    """What SafeVLM's safety verdict reads and how it computes it (docs/safety_modules.md):
    CLIP features, the text embedding of each row's first real token, and the safety
    projector, tokens and head. `SafeVLM` is one; the guard's verdict-only model
    (`safevlm_jax.guard.model.VerdictModel`) is another, holding just these parts.

    Subclasses hold `config`, `vision_tower`, `safety_projector`, `safety_tokens_head`,
    `safety_head`, and return their token embedding table from `token_embedding`.
    """

    def token_embedding(self) -> nnx.Module:
        raise NotImplementedError

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """[B, H, W, 3] -> CLIP features [B, N, C] at the configured layer and strategy."""
        return self.vision_tower.image_features(
            pixel_values, self.config.vision_feature_layer, self.config.vision_feature_select_strategy)

    def embed_text(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] -> [B, T, d]; `<image>` ids may lie outside the vocabulary, so they are masked."""
        ids = jnp.where(input_ids == self.config.image_token_index, 0, input_ids)
        return sharding.constrain(self.token_embedding()(ids), ("batch", "length", "embed"))

    def safety_logits(self, features: jax.Array, query: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Risk level [B, 4] and type [B, 7] logits from CLIP features [B, N(+1), C] and the
        text embedding of each row's first real token [B, d]."""
        if self.config.vision_feature_select_strategy == "full":
            features = features[:, 1:]  # the C-Abstractor needs the square patch grid, no CLS
        keys = safety_keys(self.safety_tokens_head, self.safety_projector(features))
        return self.safety_head(query, keys)

    def verdict_logits(self, features: jax.Array, input_ids: jax.Array,
                       attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Risk level [B, 4] and type [B, 7] logits from CLIP features [B, N(+1), C] (one image
        per row) and input_ids/attention_mask [B, T] (any padding side): the head's query is
        the embedding of each row's first real token, or of the pad token for every row
        (`SafetyConfig.query_token`)."""
        if self.config.safety.query_token == "pad":
            input_ids = jnp.full((input_ids.shape[0], 1), self.config.pad_token_id, input_ids.dtype)
            attention_mask = jnp.ones_like(input_ids)
        return self.safety_logits(features, first_token(self.embed_text(input_ids), attention_mask))


class SafeVLM(SafetyVerdict):
    """The whole model; every part is its own subtree so it can be loaded and frozen alone."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dt, pdt = config.compute_dtype, config.weights_dtype
        common = dict(scan_layers=config.scan_layers, remat_policy=config.remat_policy,
                      attention=config.attention, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.vision_tower = CLIPVisionModel(config.vision, **common)
        self.multi_modal_projector = MultiModalProjector(
            config.vision.hidden_size, config.text.hidden_size, act=config.projector_hidden_act,
            use_bias=config.multimodal_projector_bias, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.language_model = LlamaForCausalLM(config.text, config.lora, **common)
        if config.safety.enabled:
            self.safety_projector = SafetyProjector(config, rngs=rngs)
            self.safety_tokens_head = init_safety_tokens(config, rngs)
            self.safety_tokens_llm = init_safety_tokens(config, rngs)
            self.safety_head = SafetyHead(config, rngs=rngs)

    def token_embedding(self) -> nnx.Module:
        return self.language_model.model.embed_tokens

    @property
    def has_safety(self) -> bool:
        return self.config.safety.enabled

    def num_image_tokens(self, use_safety: bool = True) -> int:
        """LLM positions one `<image>` expands to (640 for LLaVA-1.5 with safety, else 576)."""
        return self.config.num_image_features + (
            self.config.safety.num_tokens if use_safety and self.has_safety else 0)

    def image_embeddings(self, features: jax.Array, use_safety: bool = True) -> jax.Array:
        """CLIP features [B, N, C] -> LLM inputs [B, (64 +) N, d]: safety_tokens_llm first."""
        emb = self.multi_modal_projector(features)
        if use_safety and self.has_safety:
            tokens = jnp.broadcast_to(self.safety_tokens_llm[...].astype(emb.dtype)[None],
                                      (emb.shape[0],) + self.safety_tokens_llm.shape)
            emb = jnp.concatenate([tokens, emb], axis=1)
        return sharding.constrain(emb, ("batch", "length", "embed"))

    def input_embeddings(self, input_ids: jax.Array, features: jax.Array | None,
                         use_safety: bool = True, image_first: jax.Array | None = None) -> jax.Array:
        """The LLM's inputs [B, T, d]: text embeddings of input_ids [B, T] (each `<image>`
        expanded to `num_image_tokens(use_safety)` image ids) with `image_embeddings` of the
        CLIP features [num_images, N, C] (or None: text only) at the image positions
        (`merge_image_embeddings`, `first=image_first`)."""
        embeds = self.embed_text(input_ids)
        if features is None:
            return embeds
        return merge_image_embeddings(embeds, input_ids, self.image_embeddings(features, use_safety),
                                      self.config.image_token_index, image_first)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None,
                 attention_mask: jax.Array, positions: jax.Array | None = None,
                 cache: Any = None, use_safety: bool = True, lm_head: bool = True) -> SafeVLMOutput:
        """input_ids [B, T] with each `<image>` already expanded to `num_image_tokens(use_safety)`
        image ids; pixel_values [num_images, H, W, 3] or None; attention_mask [B, T] (1 = real).
        `lm_head=False`: `logits` holds the LLM's final hidden states, which
        `language_model.head` turns into logits (the train step's chunked loss).
        """
        use_safety = use_safety and self.has_safety
        features = None if pixel_values is None else self.image_features(pixel_values)
        embeds, level, kind = self.input_embeddings(input_ids, features, use_safety), None, None
        if features is not None and use_safety:  # one image per row: row b's image, first token
            level, kind = self.verdict_logits(features, input_ids, attention_mask)
        if positions is None:
            positions = default_positions(attention_mask)
        logits, cache = self.language_model(embeds, positions, attention_mask, cache=cache, lm_head=lm_head)
        return SafeVLMOutput(logits, level, kind, cache)
