"""Analytic FLOPs of each planned program, from the model config alone (the yardstick the
compiled, loop-corrected count of `hlo_cost` is held against).

Counted: every matrix product of the LLM (q, k, v, o, gate, up, down, LoRA factors, LM head)
and of the vision tower (its layers up to LLaVA's feature layer, the projector), and attention
(scores and values: 2 x T x S x heads x head_dim each, where a causal mask makes S the keys up
to the query, T/2 on average). A train step adds the recomputation of each remat'd LLM layer's
forward but its last product (down_proj and its LoRA B factor: their output only makes the
next layer's input, which the backward pass has saved, so the compiler drops it; a policy that
saves the products recomputes attention only), the input gradients of every LLM product
(gradients reach the safety tokens at the LLM's input, or the LoRA factors inside it), the
weight gradients of the trained LLM weights,
and attention's backward (twice its forward). Not counted: elementwise work, the safety
projector and head (under 1% at 7B), the embedding lookup.
"""

from __future__ import annotations

from safevlm_jax.config import ModelConfig


def _layer_params(cfg: ModelConfig) -> tuple[int, int, int]:
    """(one decoder layer's dense weights, its LoRA factors, the weights of its last product:
    down_proj and its LoRA B factor)."""
    t, r = cfg.text, cfg.lora.rank
    d, q, kv, m = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim, t.intermediate_size
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "gate_proj": (d, m), "up_proj": (d, m), "down_proj": (m, d)}
    dense = sum(a * b for a, b in shapes.values())
    lora = sum(r * (a + b) for name, (a, b) in shapes.items() if name in cfg.lora.targets) if r else 0
    last = m * d + (r * d if r and "down_proj" in cfg.lora.targets else 0)
    return dense, lora, last


def lora_weights(cfg: ModelConfig) -> int:
    """The LLM's LoRA factors (what stage 2 trains)."""
    return cfg.text.num_hidden_layers * _layer_params(cfg)[1]


def vision_forward(cfg: ModelConfig, images: int) -> float:
    """The vision tower up to the feature layer, and the projector, for `images` images."""
    v, d = cfg.vision, cfg.text.hidden_size
    n = v.num_patches + 1
    layers = cfg.vision_feature_layer % (v.num_hidden_layers + 1)
    per_layer = 2 * n * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 4 * n * n * v.hidden_size
    projector = 2 * cfg.num_image_features * (v.hidden_size * d + d * d)
    return images * (layers * per_layer + projector)


def llm_forward(cfg: ModelConfig, rows: int, queries: int, keys: float, logits_per_row: int) -> float:
    """LLM forward for `rows` x `queries` tokens, each attending to `keys` keys on average,
    with the LM head at `logits_per_row` positions per row."""
    t = cfg.text
    dense, lora, _ = _layer_params(cfg)
    tokens = rows * queries
    attention = 4 * tokens * keys * t.num_attention_heads * t.head_dim
    return t.num_hidden_layers * (2 * tokens * (dense + lora) + attention) + 2 * rows * logits_per_row * t.hidden_size * t.vocab_size


def train_step(cfg: ModelConfig, rows: int, length: int, trained_llm_weights: int) -> float:
    """One optimizer step over `rows` rows of `length` tokens (one image each), of which
    `trained_llm_weights` LLM weights get gradients (the LoRA factors in stage 2; none in
    stage 1, whose gradients reach only the safety tokens at the LLM's input)."""
    t = cfg.text
    dense, lora, last = _layer_params(cfg)
    tokens = rows * length
    products = t.num_hidden_layers * 2 * tokens * (dense + lora)
    attention = t.num_hidden_layers * 4 * tokens * (length + 1) / 2 * t.num_attention_heads * t.head_dim
    head = 2 * tokens * t.hidden_size * t.vocab_size
    forward = products + attention + head
    if cfg.remat_policy == "none":
        remat = 0.0
    elif "dots" in cfg.remat_policy:  # the products' outputs are saved
        remat = attention
    else:
        remat = products - t.num_hidden_layers * 2 * tokens * last + attention
    backward = products + 2 * attention + head + 2 * tokens * trained_llm_weights
    return forward + remat + backward + vision_forward(cfg, rows)
