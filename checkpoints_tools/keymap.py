"""The one table between HF / authors' key names and our parameter paths.

A `Rule` ties one foreign key (`language_model.model.layers.3.self_attn.q_proj.weight`) to one
or more of our unscanned parameter paths (`language_model/model/layers/3/self_attn/q_proj/
kernel`) through a reversible `Transform`; both directions are exact (transposes, reshapes
and splits only, no arithmetic), so HF -> JAX -> HF returns the same bytes.

HF LLaVA files name their tensors in several ways (docs/checkpoint_format.md); `canonical_hf_key`
maps each to the published `llava-hf` names used in the table:

    vision_tower.vision_model.*  <- vision_tower.* (transformers 5 files), model.vision_tower.*
    language_model.model.*       <- model.language_model.* (in memory), language_model.layers...
    language_model.lm_head.*     <- lm_head.*
    multi_modal_projector.*      <- model.multi_modal_projector.*

The safety modules use the authors' names (docs/safety_modules.md): `safety_query_tokens` [1, T, d],
`safety_query_tokens_2` [T, d] (stored [1, T, d] as well), `safe_mm_projector.proj.*`,
`safe_part.*` (torch `nn.MultiheadAttention` packs q/k/v in `in_proj_weight` [3d, d]).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from safevlm_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Transform:
    """Foreign array <-> our arrays. `name` is one of TRANSFORMS; `parts` > 1 splits axis 0
    of the foreign array into equal parts (one per JAX path) before the per-part transform."""

    name: str
    parts: int = 1

    def to_jax(self, x: np.ndarray, dtype=None) -> list[np.ndarray]:
        """Our arrays, C-contiguous, cast to `dtype` if given (in the same copy as the
        transpose: one new array per part, not two)."""
        forward = TRANSFORMS[self.name][0]
        return [np.ascontiguousarray(forward(p), dtype=dtype) for p in np.split(x, self.parts, axis=0)]

    def to_hf(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        inverse = TRANSFORMS[self.name][1]
        return np.ascontiguousarray(np.concatenate([inverse(x) for x in xs], axis=0))

    def hf_shape(self, shapes: Sequence[tuple]) -> tuple:
        """Foreign shape from our shapes (no data touched)."""
        one = TRANSFORMS[self.name][1](np.empty(shapes[0], np.int8)).shape
        return (one[0] * len(shapes),) + tuple(one[1:])


TRANSFORMS = {
    "same": (lambda x: x, lambda x: x),
    "linear": (lambda x: x.T, lambda x: x.T),  # nn.Linear [out, in] <-> kernel [in, out]
    "conv": (lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)),  # OIHW <-> HWIO
    "unbatch": (lambda x: x[0], lambda x: x[None]),  # [1, T, d] <-> [T, d]
}


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    jax: tuple[str, ...]
    transform: Transform


def _rule(hf: str, jax_path: str, name: str = "same") -> Rule:
    return Rule(hf, (jax_path,), Transform(name))


def _dense(hf: str, ours: str, bias: bool = True) -> list[Rule]:
    return [_rule(f"{hf}.weight", f"{ours}/kernel", "linear")] + (
        [_rule(f"{hf}.bias", f"{ours}/bias")] if bias else [])


def _norm(hf: str, ours: str, bias: bool) -> list[Rule]:
    return [_rule(f"{hf}.weight", f"{ours}/scale")] + ([_rule(f"{hf}.bias", f"{ours}/bias")] if bias else [])


# Canonical HF names ----------------------------------------------------------------------------
HF_ALIASES = (
    (r"^model\.vision_tower\.(vision_model\.)?", "vision_tower.vision_model."),
    (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
    (r"^model\.language_model\.(model\.)?", "language_model.model."),
    (r"^language_model\.(?!model\.|lm_head\.)", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
)
KEY_STYLES = {
    "published": (),  # llava-hf files: loads in transformers 4 and 5
    "transformers5": ((r"^vision_tower\.vision_model\.", "vision_tower."),),  # what 5.x writes
}


def canonical_hf_key(key: str) -> str:
    for pattern, repl in HF_ALIASES:
        new = re.sub(pattern, repl, key)
        if new != key:
            return new
    return key


def styled_hf_key(key: str, style: str) -> str:
    """Canonical key -> the naming of `style` (one of KEY_STYLES)."""
    if style not in KEY_STYLES:
        raise ValueError(f"unknown key style {style!r}; known: {sorted(KEY_STYLES)}")
    for pattern, repl in KEY_STYLES[style]:
        key = re.sub(pattern, repl, key)
    return key


# Tables ------------------------------------------------------------------------------------------
def llava_rules(config: ModelConfig) -> list[Rule]:
    """HF `LlavaForConditionalGeneration` (canonical names) <-> our vision tower, projector and
    language model (LoRA excluded: see `lora_rules`)."""
    v, t = "vision_tower.vision_model", "language_model.model"
    rules = [
        _rule(f"{v}.embeddings.class_embedding", "vision_tower/embeddings/class_embedding"),
        _rule(f"{v}.embeddings.patch_embedding.weight", "vision_tower/embeddings/patch_embedding/kernel", "conv"),
        _rule(f"{v}.embeddings.position_embedding.weight", "vision_tower/embeddings/position_embedding"),
        *_norm(f"{v}.pre_layrnorm", "vision_tower/pre_layrnorm", True),
        *_norm(f"{v}.post_layernorm", "vision_tower/post_layernorm", True),
    ]
    for i in range(config.vision.num_hidden_layers):
        hf, ours = f"{v}.encoder.layers.{i}", f"vision_tower/encoder/layers/{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rules += _dense(f"{hf}.self_attn.{name}", f"{ours}/self_attn/{name}")
        rules += _norm(f"{hf}.layer_norm1", f"{ours}/layer_norm1", True)
        rules += _dense(f"{hf}.mlp.fc1", f"{ours}/mlp/fc1") + _dense(f"{hf}.mlp.fc2", f"{ours}/mlp/fc2")
        rules += _norm(f"{hf}.layer_norm2", f"{ours}/layer_norm2", True)
    bias = config.multimodal_projector_bias
    rules += _dense("multi_modal_projector.linear_1", "multi_modal_projector/linear_1", bias)
    rules += _dense("multi_modal_projector.linear_2", "multi_modal_projector/linear_2", bias)
    rules.append(_rule(f"{t}.embed_tokens.weight", "language_model/model/embed_tokens/embedding"))
    for i in range(config.text.num_hidden_layers):
        hf, ours = f"{t}.layers.{i}", f"language_model/model/layers/{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            rules += _dense(f"{hf}.self_attn.{name}", f"{ours}/self_attn/{name}", config.text.attention_bias)
        for name in ("gate_proj", "up_proj", "down_proj"):
            rules += _dense(f"{hf}.mlp.{name}", f"{ours}/mlp/{name}", config.text.mlp_bias)
        rules += _norm(f"{hf}.input_layernorm", f"{ours}/input_layernorm", False)
        rules += _norm(f"{hf}.post_attention_layernorm", f"{ours}/post_attention_layernorm", False)
    rules += _norm(f"{t}.norm", "language_model/model/norm", False)
    if not config.text.tie_word_embeddings:
        rules.append(_rule("language_model.lm_head.weight", "language_model/lm_head/kernel", "linear"))
    return rules


def _regstage(hf: str, ours: str, depth: int, in_chs: int, out_chs: int) -> list[Rule]:
    rules = []
    for b in range(1, depth + 1):
        parts = ["conv1", "conv2", "conv3"] + (["downsample"] if b == 1 and in_chs != out_chs else [])
        for part in parts:
            rules.append(_rule(f"{hf}.b{b}.{part}.conv.weight", f"{ours}/b{b}/{part}/conv/kernel", "conv"))
            rules += _norm(f"{hf}.b{b}.{part}.bn", f"{ours}/b{b}/{part}/bn", True)
        for fc in ("fc1", "fc2"):
            rules.append(_rule(f"{hf}.b{b}.se.{fc}.weight", f"{ours}/b{b}/se/{fc}/kernel", "conv"))
            rules.append(_rule(f"{hf}.b{b}.se.{fc}.bias", f"{ours}/b{b}/se/{fc}/bias"))
    return rules


def safety_rules(config: ModelConfig) -> list[Rule]:
    """The authors' safety-module keys (docs/checkpoint_format.md, no prefix) <-> our paths."""
    c, h, depth = config.vision.hidden_size, config.abstractor_hidden_size, config.safety.depth
    p, a = "safe_mm_projector.proj", "safety_head/cross_attention"
    qkv = tuple(f"{a}/{n}_proj" for n in "qkv")
    return [
        _rule("safety_query_tokens", "safety_tokens_head", "unbatch"),
        _rule("safety_query_tokens_2", "safety_tokens_llm", "unbatch"),
        *_regstage(f"{p}.net.0", "safety_projector/net_0", depth, c, h),
        *_regstage(f"{p}.net.2", "safety_projector/net_2", depth, h, h),
        *_dense(f"{p}.readout.0", "safety_projector/readout_0"),
        *_dense(f"{p}.readout.2", "safety_projector/readout_2"),
        Rule("safe_part.cross_attention.in_proj_weight", tuple(f"{q}/kernel" for q in qkv), Transform("linear", 3)),
        Rule("safe_part.cross_attention.in_proj_bias", tuple(f"{q}/bias" for q in qkv), Transform("same", 3)),
        *_dense("safe_part.cross_attention.out_proj", f"{a}/out_proj"),
        *_dense("safe_part.safety_head", "safety_head/safety_head"),
        *_dense("safe_part.other_head", "safety_head/other_head"),
    ]


LORA_TARGET_PARENTS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                       "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
PEFT_PREFIX = "base_model.model.model.language_model.layers"


def lora_rules(config: ModelConfig) -> list[Rule]:
    """peft adapter keys of `LlavaForConditionalGeneration` (transformers 5 module names) <->
    our LoRA factors: lora_A.weight [r, in] <-> lora_a [in, r]; lora_B.weight [out, r] <->
    lora_b [r, out]."""
    rules = []
    for i in range(config.text.num_hidden_layers):
        for name in config.lora.targets:
            hf = f"{PEFT_PREFIX}.{i}.{LORA_TARGET_PARENTS[name]}.{name}"
            ours = f"language_model/model/layers/{i}/{LORA_TARGET_PARENTS[name]}/{name}/lora"
            rules += [_rule(f"{hf}.lora_A.weight", f"{ours}/lora_a", "linear"),
                      _rule(f"{hf}.lora_B.weight", f"{ours}/lora_b", "linear")]
    return rules
