"""Multi-host: 2 processes x 4 fake CPU devices (coordinator on 127.0.0.1) train to the same
parameters as 1 process x 8 devices fed the same global batches, and export together a
library checkpoint equal to the single process's export."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from configs.stage1 import get_config
from safevlm_jax import sharding
from safevlm_jax.checkpoint.format import load_checkpoint
from safevlm_jax.checkpoint.io import flat_values
from safevlm_jax.config import ModelConfig
from safevlm_jax.data.pipeline import make_global_batch
from safevlm_jax.train.data import make_dataset, prepare_synthetic
from safevlm_jax.train.init import initial_state
from safevlm_jax.train.loop import export_checkpoint, model_factory
from safevlm_jax.train.optimizer import make_optimizer
from safevlm_jax.train.state import abstract_state
from safevlm_jax.train.step import jit_train_step, make_train_step

from train_helpers import read_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference(cfg, workdir):
    """Single process, 8 devices; global batch = concat of the two processes' batches.
    Returns the trainable leaves and the path of the exported model."""
    mcfg = ModelConfig.from_dict(cfg.model)
    per_process = cfg.batch_per_device * 4 * cfg.accumulation
    iters = [iter(make_dataset(cfg, mcfg, workdir, per_process, None, i, 2)[0]) for i in range(2)]
    optimizer, schedule = make_optimizer(cfg.optimizer, STEPS)
    graphdef, abstract = abstract_state(model_factory(mcfg, cfg.seed), cfg, optimizer)
    mesh = sharding.make_mesh({"fsdp": 8})
    first = [next(it) for it in iters]
    batch_abs = jax.eval_shape(lambda: {k: np.concatenate([b[k] for b in first]) for k in first[0]})
    step_fn, state_sh, batch_sh = jit_train_step(
        make_train_step(graphdef, optimizer, schedule, accumulation=cfg.accumulation,
                        head_weight=cfg.head_weight), abstract, batch_abs, mesh, cfg.rules)
    state = initial_state(model_factory(mcfg, cfg.seed), cfg, optimizer, state_sh)
    for step in range(STEPS):
        parts = first if step == 0 else [next(it) for it in iters]
        batch = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
        state, _ = step_fn(state, make_global_batch(batch, batch_sh))
    export = export_checkpoint(state, cfg, mcfg, os.path.join(workdir, "export"))
    return [np.asarray(x) for x in jax.tree.leaves(state.trainable)], export


def exported_params(directory):
    """{key: host array} of the Params of a library checkpoint."""
    _, model = load_checkpoint(directory)
    return {k: np.asarray(v) for k, v in flat_values(nnx.state(model, nnx.Param)).items()}


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
    cfg = get_config("tiny")
    dataset_dir, tokenizer = prepare_synthetic(str(tmp_path / "data"), 32, 0, ModelConfig.from_dict(cfg.model))
    overrides = [f"--config.total_steps={STEPS}", f"--config.checkpoint.every_steps={STEPS}",
                 f"--config.data.dataset_dir={dataset_dir}", f"--config.data.tokenizer={tokenizer}"]
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "safevlm_jax.train", "--config", "configs/stage1.py:tiny",
         "--workdir", str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{port}",
         "--num_processes", "2", "--process_id", str(i), *overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]

    cfg.data.dataset_dir, cfg.data.tokenizer = dataset_dir, tokenizer
    want, want_export = reference(cfg, str(tmp_path / "ref"))
    saved = read_state(str(tmp_path / "run" / "checkpoints" / str(STEPS) / "state"))
    got = [np.asarray(x) for x in jax.tree.leaves(saved["train"]["trainable"])]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # Adam magnifies ~1e-9 grad noise

    assert not [f for f in os.listdir(tmp_path / "run") if ".tmp" in f]  # the temp dir was renamed
    got, want = exported_params(str(tmp_path / "run" / "export")), exported_params(want_export)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)
