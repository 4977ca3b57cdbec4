"""Training: optimizer and masks, losses, the sharded train step, checkpoints, metrics, loop.

    metrics = safevlm_jax.train.train(config, workdir)    # config: configs/stage1.py etc.

`python -m safevlm_jax.train --config configs/stage1.py:tiny --workdir DIR` runs the same
`loop.train`. It is imported on first use: `python -m safevlm_jax.train` must start
`jax.distributed` before the loop's modules touch any device.
"""


def __getattr__(name: str):
    """`train` is `loop.train`, imported when first asked for."""
    if name != "train":
        raise AttributeError(f"module 'safevlm_jax.train' has no attribute {name!r}")
    from safevlm_jax.train.loop import train  # lazy: see the module docstring

    globals()["train"] = train
    return train
