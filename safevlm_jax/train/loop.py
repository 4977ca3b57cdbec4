"""`train(config, workdir)`: build or resume, then run the jitted step over the data.

Every process runs this same function (SPMD): each feeds its own shard of the global batch
(`make_array_from_process_local_data`), the step is one `jax.jit` over the whole mesh.
"""

from __future__ import annotations

import logging
import os

import jax
from flax import nnx

from safevlm_jax import sharding
from safevlm_jax.checkpoint.format import save_checkpoint
from safevlm_jax.checkpoint.io import local_path
from safevlm_jax.config import ModelConfig
from safevlm_jax.data.pipeline import make_global_batch
from safevlm_jax.models.safevlm import SafeVLM
from safevlm_jax.train import data as train_data, init as train_init
from safevlm_jax.train.checkpointing import Checkpointer
from safevlm_jax.train.metrics import MetricsLogger, peak_flops, step_flops
from safevlm_jax.train.optimizer import make_optimizer
from safevlm_jax.train.state import TrainState, abstract_state, with_shardings
from safevlm_jax.train.step import jit_train_step, make_train_step


def model_factory(mcfg: ModelConfig, seed: int):
    return lambda: SafeVLM(mcfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def export_checkpoint(state: TrainState, cfg, mcfg: ModelConfig, directory: str) -> str:
    """Saves the trained model (all its Params, cast to `cfg.frozen_dtype` or the model's
    param dtype) in the library format, for the next stage, recording the conversation
    template its data used (`cfg.data.template`). Multi-process: every process calls it and
    all return once `directory` is complete (`checkpoint.save_checkpoint`)."""
    dtype = cfg.frozen_dtype or mcfg.param_dtype
    params = nnx.filter_state(nnx.merge_state(state.trainable, state.frozen), nnx.Param)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    return save_checkpoint(directory, params, mcfg.replace(param_dtype=dtype), template=cfg.data.template)


def train(cfg, workdir: str) -> dict:
    """Trains per `cfg` (see configs/train_common.py); returns the last step's metrics."""
    for what, path in (("--workdir", workdir), ("--config.init_from", cfg.init_from),
                       ("--config.data.dataset_dir", cfg.data.dataset_dir),
                       ("--config.data.tokenizer", cfg.data.tokenizer)):
        if path:
            local_path(path, what)  # refuse URLs before anything runs
    mcfg = ModelConfig.from_dict(cfg.model)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    micro = cfg.batch_per_device * jax.local_device_count()
    per_process = micro * cfg.accumulation
    dataset, examples = train_data.make_dataset(cfg, mcfg, workdir, per_process, num_epochs=None)
    steps_per_epoch = examples // per_process
    total = cfg.total_steps if cfg.total_steps > 0 else cfg.num_epochs * steps_per_epoch
    if total <= 0:
        raise ValueError(f"{examples} examples per process give no step of {per_process} rows")

    optimizer, schedule = make_optimizer(cfg.optimizer, total)
    make_model = model_factory(mcfg, cfg.seed)
    graphdef, abstract = abstract_state(make_model, cfg, optimizer)
    state_sh = sharding.state_shardings(abstract, mesh, cfg.rules, cfg.sharding_fallback)
    data_iter = iter(dataset)
    batch_abs = jax.eval_shape(lambda b: b, next(iter(dataset)))
    batch_abs = {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(),) + v.shape[1:], v.dtype)
                 for k, v in batch_abs.items()}
    step_fn, _, batch_sh = jit_train_step(
        make_train_step(graphdef, optimizer, schedule, accumulation=cfg.accumulation,
                        head_weight=cfg.head_weight), abstract, batch_abs, mesh, cfg.rules, cfg.sharding_fallback)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                        every_steps=cfg.checkpoint.every_steps, async_save=cfg.checkpoint.async_save)
    state = train_init.initial_state(make_model, cfg, optimizer, state_sh)
    if cfg.init_from:
        state = train_init.load_params(state, cfg.init_from, mesh, cfg.rules, cfg.sharding_fallback)
    if ckpt.latest_step() is not None:  # the frozen params stay those built above
        try:
            state = ckpt.restore(with_shardings(abstract, state_sh), state, data_iter)  # newest intact
        except ValueError:
            ckpt.close()  # its background threads would otherwise print past the error line at exit
            raise
        logging.warning("resuming from step %d", int(state.step))

    start = int(state.step)
    tokens = batch_abs["input_ids"].shape[0] * batch_abs["input_ids"].shape[1]
    flops = step_flops(abstract.trainable, abstract.frozen, tokens, batch_abs["pixel_values"].shape[0],
                       mcfg.vision.num_patches)
    logger = MetricsLogger(workdir, total, start, cfg.log_every_steps, flops, tokens,
                           peak_flops(cfg.peak_tflops_per_device))
    profile = [int(x) for x in cfg.profile_steps.split(",")] if cfg.profile_steps else None
    metrics = {}
    for step in range(start, total):
        if profile and step == profile[0]:
            jax.profiler.start_trace(os.path.join(workdir, "profile"))
        batch = make_global_batch(next(data_iter), batch_sh)
        state, metrics = step_fn(state, batch)
        if profile and step + 1 == profile[0] + profile[1]:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
        logger.log(step + 1, metrics)
        ckpt.save(step + 1, state, data_iter, force=step + 1 == total)
    ckpt.wait()
    ckpt.close()
    logger.close()
    export = os.path.join(workdir, "export")
    if cfg.export and not os.path.exists(export):
        export_checkpoint(state, cfg, mcfg, export)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}
