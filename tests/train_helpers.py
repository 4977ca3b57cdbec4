"""Shared helpers of the training tests: tiny configs, a model, a random well-formed batch."""

from __future__ import annotations

import numpy as np
import optax
from flax import nnx

from configs.stage1 import get_config as stage1_config
from configs.stage2 import get_config as stage2_config
from safevlm_jax.config import ModelConfig
from safevlm_jax.models.safevlm import SafeVLM
from safevlm_jax.train.optimizer import make_optimizer
from safevlm_jax.train.state import create_state


def tiny_train_config(stage: int, **overrides):
    cfg = (stage1_config if stage == 1 else stage2_config)("tiny")
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def build(cfg, total_steps: int = 10):
    """(model_config, graphdef, TrainState, optimizer, schedule) for a train config."""
    mcfg = ModelConfig.from_dict(cfg.model)
    model = SafeVLM(mcfg, rngs=nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1))
    optimizer, schedule = make_optimizer(cfg.optimizer, total_steps)
    graphdef, state = create_state(model, cfg, optimizer)
    return mcfg, graphdef, state, optimizer, schedule


def random_batch(mcfg: ModelConfig, batch: int, length: int = 40, seed: int = 0) -> dict:
    """[BOS, <image> x n, text...] rows with answers labelled in the second half."""
    rng = np.random.default_rng(seed)
    n_img = mcfg.num_image_tokens
    ids = rng.integers(3, 400, size=(batch, length)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1:1 + n_img] = mcfg.image_token_index
    labels = np.full_like(ids, -100)
    start = 1 + n_img + (length - 1 - n_img) // 2
    labels[:, start:] = ids[:, start:]
    size = mcfg.vision.image_size
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": np.ones_like(ids),
        "pixel_values": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        "safe_level": rng.integers(0, 4, size=(batch,)).astype(np.int32),
        "safe_type": rng.integers(0, 7, size=(batch,)).astype(np.int32),
    }


def sgd(lr: float = 0.1):
    return optax.sgd(lr), optax.constant_schedule(lr)


def read_state(path: str) -> dict:
    """A saved `state` item as nested dicts of numpy arrays (on any device count)."""
    import jax
    import orbax.checkpoint as ocp

    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
