"""Demo presets: the small SafeVLM shipped in `safevlm_jax/assets/demo/` (launch/make_demo.sh).

    python -m safevlm_jax.train --config configs/demo.py:stage0 --workdir W0 \
        --config.data.dataset_dir=DS --config.data.tokenizer=TOK
    python -m safevlm_jax.train --config configs/demo.py:stage1 --workdir W1 ... --config.init_from=W0/export
    python -m safevlm_jax.train --config configs/demo.py:stage2 --workdir W2 ... --config.init_from=W1/export

stage0 stands in for LLaVA pre-training: CLIP, projector and LLM learn the synthetic dialogues
from scratch, as plain LLaVA without safety modules (so its LLM, like `--safety off`, never
sees safety tokens); stage1 adds them with a fresh init, since init_from keeps the init of what
a checkpoint lacks. stage1 and
stage2 are the paper's stages (docs/architecture.md) at this size: the safety modules, then LoRA on
the LLM linears. The model is about 2M parameters: a CLIP-like tower on 64 px images in 8 px
patches (an 8 x 8 grid, which the C-Abstractor keeps as its 64 queries), a 4-layer LLaMA decoder of
width 128, and the vocabulary of `launch/demo.py`'s tokenizer (1000 tokens, then <image>, <pad>).
"""

import dataclasses

import ml_collections

from configs.train_common import LORA, SAFETY_MODULES, train_config
from safevlm_jax.config import LoRAConfig, ModelConfig, SafetyConfig, TextConfig, VisionConfig

VOCAB = 1000  # tokenizer size = image_token_index
BASE = r"^(vision_tower|multi_modal_projector|language_model)(/|$)"

MODEL = ModelConfig(
    vision=VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                        num_attention_heads=4, image_size=64, patch_size=8),
    text=TextConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512),
    safety=SafetyConfig(num_tokens=8, head_num_heads=4),
    image_token_index=VOCAB,
    pad_token_id=VOCAB + 1,
)
# stage: (train_common stage, trainable patterns, steps, peak lr, warm-up steps, λ)
# With batch 16 over 3600 records (3000 synthetic, 600 photo crops): stage 0 about 2 epochs;
# stage 1 too (at 150 steps, 2/3 of one, the head confused thin orange and brown crosses with red).
STAGES = {
    "stage0": (1, (BASE,), 450, 2e-3, 30, 0.0),
    "stage1": (1, (SAFETY_MODULES,), 450, 2e-3, 20, 10.0),
    "stage2": (2, (LORA,), 120, 1e-3, 10, 10.0),
}


def get_config(arg: str = "stage0") -> ml_collections.ConfigDict:
    if arg not in STAGES:
        raise ValueError(f"unknown demo preset {arg!r}; known: {sorted(STAGES)}")
    stage, trainable, steps, lr, warmup, head_weight = STAGES[arg]
    c = train_config(stage, "tiny")
    model = MODEL
    if arg == "stage0":  # plain LLaVA: no safety modules, so its LLM never sees safety tokens
        model = MODEL.replace(safety=dataclasses.replace(MODEL.safety, enabled=False))
    if stage == 2:
        model = MODEL.replace(lora=LoRAConfig(rank=16, alpha=16.0, dropout=0.05))
    c.model = model.to_dict()
    c.trainable = trainable
    c.head_weight = head_weight
    c.total_steps = steps
    c.optimizer.lr = lr
    c.optimizer.warmup_steps = warmup
    c.batch_per_device = 16
    c.accumulation = 1
    c.data.max_length = 192
    c.checkpoint.every_steps = 100
    c.log_every_steps = 10
    return c
