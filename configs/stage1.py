"""Stage 1 (docs/architecture.md, "Training"): train safety tokens, safety projector and safety
head; all else frozen.

    python -m safevlm_jax.train --config configs/stage1.py:tiny --workdir /tmp/s1
    python -m safevlm_jax.train --config configs/stage1.py:7b --workdir /gcs/BUCKET/runs/s1 \
        --config.init_from=/gcs/BUCKET/llava-1.5-7b \
        --config.data.dataset_dir=/gcs/BUCKET/data/safe_vlm_data/1.0.0 \
        --config.data.tokenizer=/gcs/BUCKET/llava-1.5-7b

Paths are POSIX paths every host sees (a bucket mounted with gcsfuse, not a gs:// URL).
`init_from` is a library checkpoint directory: HF LLaVA imported with
`python -m checkpoints_tools.import_hf --hf_dir llava-1.5-7b-hf --out /gcs/BUCKET/llava-1.5-7b`,
which also holds LLaVA's tokenizer files; `dataset_dir` is what `python -m safevlm_jax.data.build`
prints. The tiny preset needs neither: it builds synthetic data and a tokenizer in the workdir.
"""

from configs.train_common import train_config


def get_config(arg: str = "tiny"):
    return train_config(stage=1, preset=arg)
