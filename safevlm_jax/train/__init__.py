"""Training: optimizer and masks, losses, the sharded train step, checkpoints, metrics, loop.

`python -m safevlm_jax.train --config configs/stage1.py:tiny --workdir DIR` runs `loop.train`.
"""
