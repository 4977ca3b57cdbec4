"""Stage 2 (docs/architecture.md, "Training"): LoRA r=256 α=16 dropout 0.05 on
q,k,v,o,gate,up,down; only LoRA trains.

    python -m safevlm_jax.train --config configs/stage2.py:tiny --workdir /tmp/s2 \
        --config.init_from=/tmp/s1/export
    python -m safevlm_jax.train --config configs/stage2.py:7b --workdir /gcs/BUCKET/runs/s2 \
        --config.init_from=/gcs/BUCKET/runs/s1/export \
        --config.data.dataset_dir=/gcs/BUCKET/data/safe_vlm_data/1.0.0 \
        --config.data.tokenizer=/gcs/BUCKET/llava-1.5-7b

`init_from` is the stage-1 run's WORKDIR/export (a library checkpoint directory); the LoRA
adapters it lacks start from their init (lora_b = 0, so training starts at the stage-1 model).
"""

from configs.train_common import train_config


def get_config(arg: str = "tiny"):
    return train_config(stage=2, preset=arg)
