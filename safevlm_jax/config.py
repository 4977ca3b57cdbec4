"""Model configuration: frozen dataclasses, built from presets or from an HF `LlavaConfig`.

The presets in `configs/` are ml_collections ConfigDicts (so they can be overridden from the
command line); `ModelConfig.from_dict` turns the `model` part of one into this typed form, and
`ModelConfig.from_hf` reads a real checkpoint's `config.json` through transformers, so no size
is ever hard-coded for a real model (docs/checkpoint_format.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYER_INPUT = "layer_input"  # checkpoint name of each stacked layer's input (models/stack.py)
# remat_policy name -> jax.checkpoint policy; "none" means no remat at all
REMAT_POLICIES: dict[str, Any] = {
    "full": None,  # jax.checkpoint's default: save only the layer inputs
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # as "full", but the saved layer inputs wait for the backward pass in host memory, not HBM
    # (a TPU's pinned host memory: [layers, batch, length, embed] leave the chip)
    "offload_layer_inputs": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device", offload_dst="pinned_host"),
}
# models/attention.py: "auto" picks per platform at lowering time (tpu: splash, cuda: cudnn, cpu: cpu_blocks)
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn", "cpu_blocks")
SELECT_STRATEGIES = ("default", "full")  # LLaVA's vision_feature_select_strategy: drop CLS or keep it


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower (HF `CLIPVisionConfig` field names)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """LLaMA/Vicuna decoder (HF `LlamaConfig` field names)."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")


QUERY_TOKENS = ("bos", "pad")


@dataclasses.dataclass(frozen=True)
class SafetyConfig:
    """SafeVLM safety modules (docs/safety_modules.md).

    query_token: the safety head's query. "bos": the text embedding of each row's first real
    token (BOS), as the paper describes it. "pad": the embedding of the pad token
    (`ModelConfig.pad_token_id`, LLaVA-1.5's `<pad>` = 32001) for every row: the PSA-VLM
    authors' training code (`dataloader/safe_data.py`) moves padding to the front, so a head
    trained by it read `<pad>` at position 0; choose "pad" for such weights.
    """

    enabled: bool = True
    num_tokens: int = 64
    abstractor_hidden_size: int | None = None  # None: vision width + 64 (authors' setting)
    num_queries: int | None = None  # None: the number of image patches
    depth: int = 3
    se_ratio: float = 0.25
    layer_norm_eps: float = 1e-5
    head_num_heads: int = 8
    num_levels: int = 4
    num_types: int = 7
    query_token: str = "bos"

    def __post_init__(self):
        if self.query_token not in QUERY_TOKENS:
            raise ValueError(f"safety.query_token must be one of {QUERY_TOKENS}, got {self.query_token!r}")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA on the LLM linears; rank 0 means no LoRA parameters at all."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a `SafeVLM` (LLaVA-1.5 + safety modules)."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    safety: SafetyConfig = SafetyConfig()
    lora: LoRAConfig = LoRAConfig()
    image_token_index: int = 32000
    pad_token_id: int = 32001
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "auto"  # models/attention.py: auto | xla | splash | cudnn | cpu_blocks

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy must be one of {SELECT_STRATEGIES}, "
                             f"got {self.vision_feature_select_strategy!r}")
        if self.remat_policy != "none" and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be 'none' or one of {sorted(REMAT_POLICIES)}, "
                             f"got {self.remat_policy!r}")
        for name in (self.dtype, self.param_dtype):
            jnp.dtype(name)  # raises a TypeError naming the bad dtype

    # Derived sizes -------------------------------------------------------------------------
    @property
    def num_image_features(self) -> int:
        """Image positions from the projector for one image (576 for CLIP-L/336, default)."""
        n = self.vision.num_patches
        return n + 1 if self.vision_feature_select_strategy == "full" else n

    @property
    def num_image_tokens(self) -> int:
        """LLM positions for one `<image>`: safety tokens (if enabled) + image features."""
        return self.num_image_features + (self.safety.num_tokens if self.safety.enabled else 0)

    @property
    def abstractor_hidden_size(self) -> int:
        return self.safety.abstractor_hidden_size or self.vision.hidden_size + 64

    @property
    def num_queries(self) -> int:
        return self.safety.num_queries or self.vision.num_patches

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self):
        return jnp.dtype(self.param_dtype)

    # (De)serialisation ---------------------------------------------------------------------
    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Builds from a plain dict or ConfigDict; unknown keys are an error (typos matter)."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        sub = {"vision": VisionConfig, "text": TextConfig, "safety": SafetyConfig, "lora": LoRAConfig}
        kw = {}
        for key, value in d.items():
            if key in sub:
                value = _build(sub[key], value, f"model.{key}")
            kw[key] = value
        return _build(cls, kw, "model", already_built=True)

    def save(self, path: str, extra: Mapping[str, Any] | None = None) -> None:
        """Writes the config as JSON; `extra`: more top-level keys (a checkpoint's conversation
        template), which `load` does not take (`checkpoint.format.load_config` drops them)."""
        with open(path, "w") as f:
            json.dump({**self.to_dict(), **(extra or {})}, f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        with open(path) as f:
            try:
                return cls.from_dict(json.load(f))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: {e}") from e

    @classmethod
    def from_hf(cls, hf_config_or_dir: Any, **overrides) -> "ModelConfig":
        """From a `transformers.LlavaConfig` or a directory/`config.json` holding one.

        Sizes come from transformers (which fills the library defaults the published files
        leave out, docs/checkpoint_format.md); SafeVLM safety settings come from `overrides`
        (default: docs/safety_modules.md).
        """
        hf = hf_config_or_dir
        if isinstance(hf, (str, os.PathLike)):
            import transformers  # heavy: only needed for this path

            path = os.fspath(hf)
            if os.path.isfile(path):
                path = os.path.dirname(path) or "."
            hf = transformers.LlavaConfig.from_pretrained(path, local_files_only=True)
        v, t = hf.vision_config, hf.text_config
        rope = getattr(t, "rope_parameters", None) or {}
        rope_theta = rope.get("rope_theta", getattr(t, "rope_theta", None) or 10000.0)
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"unsupported rope_type {rope.get('rope_type')!r} (only 'default')")
        layer = hf.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer must be one layer index, got {layer!r}")
        text = TextConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
            head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
            rms_norm_eps=t.rms_norm_eps,
            rope_theta=float(rope_theta),
            max_position_embeddings=t.max_position_embeddings,
            tie_word_embeddings=bool(getattr(t, "tie_word_embeddings", False)
                                     or getattr(hf, "tie_word_embeddings", False)),
            hidden_act=t.hidden_act,
            attention_bias=bool(getattr(t, "attention_bias", False)),
            mlp_bias=bool(getattr(t, "mlp_bias", False)),
        )
        vision = VisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            num_channels=v.num_channels,
            layer_norm_eps=v.layer_norm_eps,
            hidden_act=v.hidden_act,
        )
        pad = getattr(hf, "pad_token_id", None)
        if pad is None:
            pad = getattr(t, "pad_token_id", None)
        kw = dict(
            vision=vision,
            text=text,
            image_token_index=hf.image_token_index,
            pad_token_id=-1 if pad is None else pad,
            vision_feature_layer=layer,
            vision_feature_select_strategy=hf.vision_feature_select_strategy,
            projector_hidden_act=hf.projector_hidden_act,
            multimodal_projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self):
        """The inverse of `from_hf`: a `transformers.LlavaConfig` equal to this config (sizes,
        ids, feature layer, dtype); safety settings are ours and stay out of it."""
        import transformers  # heavy: only needed for this path

        v, t = self.vision, self.text
        vision = transformers.CLIPVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
            image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
            layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)
        text = transformers.LlamaConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
            max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=t.tie_word_embeddings,
            hidden_act=t.hidden_act, attention_bias=t.attention_bias, mlp_bias=t.mlp_bias)
        return transformers.LlavaConfig(
            vision_config=vision, text_config=text, image_token_index=self.image_token_index,
            pad_token_id=None if self.pad_token_id < 0 else self.pad_token_id,
            vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            projector_hidden_act=self.projector_hidden_act,
            multimodal_projector_bias=self.multimodal_projector_bias,
            tie_word_embeddings=t.tie_word_embeddings, dtype=self.param_dtype)


def _build(cls, value, where: str, already_built: bool = False):
    if dataclasses.is_dataclass(value) and not already_built:
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{where}: expected a mapping, got {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    value = dict(value)
    for f in dataclasses.fields(cls):
        if f.name in value and isinstance(value[f.name], list):
            value[f.name] = tuple(value[f.name])
    return cls(**value)
