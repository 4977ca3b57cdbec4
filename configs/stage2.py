"""Stage 2 (SPEC §3): LoRA r=256 α=16 dropout 0.05 on q,k,v,o,gate,up,down; only LoRA trains.

    python -m safevlm_jax.train --config configs/stage2.py:tiny --workdir /tmp/s2 \
        --config.init_from=ckpt:/tmp/s1/export
"""

from configs.train_common import train_config


def get_config(arg: str = "tiny"):
    return train_config(stage=2, preset=arg)
