"""Shared training config for `stage1.py` / `stage2.py` (docs/architecture.md,
"Training"); every field is data.

Presets: `tiny` (CPU tests: f32, larger lr so a few steps visibly learn), `7b`, `13b`
(bf16 compute, f32 master weights for what trains, bf16 frozen weights, scanned + rematted
layers, fsdp over every device).
"""

import ml_collections

from configs.model import model_config
from safevlm_jax.config import LoRAConfig

MODEL_PRESETS = {"tiny": "tiny", "7b": "llava_7b", "13b": "llava_13b"}

# Path regexes (re.search on 'a/b/c' nnx state paths) of the parameters each stage trains.
SAFETY_MODULES = r"^(safety_tokens_head|safety_tokens_llm|safety_projector|safety_head)(/|$)"
LORA = r"^language_model/.*/lora/lora_[ab]$"


def train_config(stage: int, preset: str) -> ml_collections.ConfigDict:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(MODEL_PRESETS)}")
    tiny = preset == "tiny"
    model = model_config(MODEL_PRESETS[preset])
    if not tiny:  # bf16 compute, f32 parameters (frozen ones are cast to `frozen_dtype`)
        model = model.replace(dtype="bfloat16", param_dtype="float32", scan_layers=True,
                              remat_policy="full")
    if stage == 2:
        model = model.replace(lora=LoRAConfig(rank=8 if tiny else 256, alpha=16.0, dropout=0.05))

    c = ml_collections.ConfigDict()
    c.model = model.to_dict()
    c.stage = stage
    # Stage 2 keeps the safety modules frozen (authors' recipe); add SAFETY_MODULES to train them.
    c.trainable = (SAFETY_MODULES,) if stage == 1 else (LORA,)
    c.frozen_dtype = "" if tiny else "bfloat16"  # "" keeps the model's param_dtype
    # "" (random init from `seed`) or a library checkpoint directory: an imported HF LLaVA
    # (`python -m checkpoints_tools.import_hf`) for stage 1, the stage-1 run's WORKDIR/export
    # for stage 2. Parameters the checkpoint lacks (new LoRA adapters) keep their init. Resuming
    # reads it again: training checkpoints store no frozen params.
    c.init_from = ""
    c.seed = 0
    c.head_weight = 10.0  # λ in L = L_LM + λ (CE level + CE type)

    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3 if tiny else 1e-5, warmup_steps=2 if tiny else (20 if stage == 1 else 300),
        end_lr_fraction=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0))
    c.batch_per_device = 2
    c.accumulation = 2 if tiny else 8  # global batch = batch_per_device x devices x accumulation
    c.num_epochs = 3 if stage == 1 else 1
    c.total_steps = -1  # > 0 overrides num_epochs

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.rules = "fsdp"
    # an axis the mesh does not divide: "error" (naming the parameter), or "replicate" it, logged
    c.sharding_fallback = "error"

    c.data = ml_collections.ConfigDict(dict(
        dataset_dir="",  # a dataset from `python -m safevlm_jax.data.build`; "" = synthetic
        tokenizer="",  # HF tokenizer directory; "" = the one trained on the synthetic data
        synthetic_examples=64,  # used when dataset_dir is ""
        max_length=256 if tiny else 2048,
        template="v1",
        aspect_mode="pad",
        read_threads=2 if tiny else 16,  # grain ReadOptions
        prefetch=4 if tiny else 64,
    ))

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=5 if tiny else 200, keep=3,
                                                  async_save=True))
    c.export = True  # write the final model to WORKDIR/export (library checkpoint format)
    c.log_every_steps = 1 if tiny else 10
    c.profile_steps = ""  # "START,COUNT": a jax profiler trace into WORKDIR/profile
    c.peak_tflops_per_device = 0.0  # 0: look the device kind up (metrics.PEAK_TFLOPS)
    return c
