"""Stage 1 (SPEC §3): train safety tokens, safety projector and safety head; all else frozen.

    python -m safevlm_jax.train --config configs/stage1.py:tiny --workdir /tmp/s1
    python -m safevlm_jax.train --config configs/stage1.py:7b --workdir gs://b/s1 \
        --config.init_from=hf:/ckpt/llava-1.5-7b-hf
"""

from configs.train_common import train_config


def get_config(arg: str = "tiny"):
    return train_config(stage=1, preset=arg)
