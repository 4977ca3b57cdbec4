"""Checkpoints: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted
run; a checkpoint restores onto another device count; steps store no frozen params, and a
resume over other frozen params is refused; stage 2 starts from a stage-1 export."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from safevlm_jax import sharding
from safevlm_jax.checkpoint.io import path_str
from safevlm_jax.config import ModelConfig
from safevlm_jax.train.checkpointing import Checkpointer, frozen_fingerprint, split_frozen
from safevlm_jax.train.data import prepare_synthetic
from safevlm_jax.train.init import initial_state, load_params
from safevlm_jax.train.loop import model_factory
from safevlm_jax.train.optimizer import make_optimizer
from safevlm_jax.train.state import abstract_state, with_shardings

from train_helpers import read_state, tiny_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    cfg = tiny_train_config(1)
    return prepare_synthetic(str(tmp_path_factory.mktemp("data")), 32, 0, ModelConfig.from_dict(cfg.model))


def command(workdir, dataset, *extra):
    dataset_dir, tokenizer = dataset
    return [sys.executable, "-m", "safevlm_jax.train", "--config", "configs/stage1.py:tiny",
            "--workdir", str(workdir), f"--config.total_steps={STEPS}",
            "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=10",
            f"--config.data.dataset_dir={dataset_dir}", f"--config.data.tokenizer={tokenizer}", *extra]


def env():
    return dict(os.environ, PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"))


def finished_steps(ckpt_dir):
    return [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []


def saved_state(workdir, step):
    tree = read_state(os.path.join(workdir, "checkpoints", str(step), "state"))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset):
    workdir = tmp_path_factory.mktemp("full")
    subprocess.run(command(workdir, dataset), cwd=ROOT, env=env(), check=True, timeout=600)
    return workdir


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path, dataset, uninterrupted):
    proc = subprocess.Popen(command(tmp_path, dataset), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not finished_steps(tmp_path / "checkpoints") and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(finished_steps(tmp_path / "checkpoints"))
    assert killed_at < STEPS
    subprocess.run(command(tmp_path, dataset), cwd=ROOT, env=env(), check=True, timeout=600)
    want, got = saved_state(uninterrupted, STEPS), saved_state(tmp_path, STEPS)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_restore_onto_a_different_device_count(uninterrupted):
    cfg = tiny_train_config(1)
    mcfg = ModelConfig.from_dict(cfg.model)
    optimizer, _ = make_optimizer(cfg.optimizer, STEPS)
    _, abstract = abstract_state(model_factory(mcfg, cfg.seed), cfg, optimizer)
    ckpt = Checkpointer(str(uninterrupted / "checkpoints"), keep=10, every_steps=2, async_save=False)
    values = []
    for n, shape in ((8, {"fsdp": 8}), (2, {"fsdp": 2})):
        mesh = sharding.make_mesh(shape, jax.devices()[:n])
        shardings = sharding.state_shardings(abstract, mesh, "fsdp")
        initial = initial_state(model_factory(mcfg, cfg.seed), cfg, optimizer, shardings)
        state = ckpt.restore(with_shardings(abstract, shardings), initial, step=STEPS)
        assert int(state.step) == STEPS
        leaf = jax.tree.leaves(state.trainable)[0]
        assert len(leaf.sharding.device_set) == n
        values.append([np.asarray(x) for x in jax.tree.leaves(state)])
    for a, b in zip(*values):
        np.testing.assert_array_equal(a, b)


def test_stage2_starts_from_the_stage1_export(uninterrupted):
    export = str(uninterrupted / "export")
    cfg = tiny_train_config(2)
    mcfg = ModelConfig.from_dict(cfg.model)
    optimizer, _ = make_optimizer(cfg.optimizer, STEPS)
    mesh = sharding.make_mesh({"fsdp": 8})
    _, abstract = abstract_state(model_factory(mcfg, cfg.seed), cfg, optimizer)
    fresh = initial_state(model_factory(mcfg, cfg.seed), cfg, optimizer,
                          sharding.state_shardings(abstract, mesh, cfg.rules))
    fresh_lora = {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(fresh.trainable)}
    state = load_params(fresh, export, mesh, cfg.rules)
    stage1 = saved_state(uninterrupted, STEPS)  # safety tokens are trained (stored) in stage 1
    tokens = np.asarray(nnx.to_flat_state(state.frozen).to_nested_state()["safety_tokens_llm"].get_value())
    assert any(np.array_equal(tokens, v) for k, v in stage1.items() if "safety_tokens_llm" in k)
    for p, v in nnx.to_flat_state(state.trainable):  # LoRA is not in a stage-1 export: kept
        np.testing.assert_array_equal(np.asarray(v.get_value()), fresh_lora[path_str(p)])


def test_checkpoints_store_trained_state_but_no_frozen_params(uninterrupted):
    cfg = tiny_train_config(1)
    optimizer, _ = make_optimizer(cfg.optimizer, STEPS)
    _, abstract = abstract_state(model_factory(ModelConfig.from_dict(cfg.model), cfg.seed), cfg, optimizer)
    frozen_params = split_frozen(abstract.frozen)[0]
    saved = saved_state(uninterrupted, STEPS)
    assert saved["['frozen_fingerprint']"].shape == (len(jax.tree.leaves(frozen_params)),)
    assert not [k for k in saved if k.startswith("['train']['frozen']")]  # tiny has no RNG streams
    trained = sum(x.size for x in jax.tree.leaves((abstract.trainable, abstract.opt_state)))
    hashes, rng, step = len(jax.tree.leaves(frozen_params)), 2, 1
    assert sum(v.size for v in saved.values()) == trained + hashes + rng + step


def test_resume_refuses_other_frozen_params(uninterrupted):
    cfg = tiny_train_config(1)
    mcfg = ModelConfig.from_dict(cfg.model)
    optimizer, _ = make_optimizer(cfg.optimizer, STEPS)
    _, abstract = abstract_state(model_factory(mcfg, cfg.seed), cfg, optimizer)
    shardings = sharding.state_shardings(abstract, sharding.make_mesh({"fsdp": 8}), "fsdp")
    initial = initial_state(model_factory(mcfg, cfg.seed), cfg, optimizer, shardings)
    ckpt = Checkpointer(str(uninterrupted / "checkpoints"), keep=10, every_steps=2, async_save=False)
    flat = nnx.to_flat_state(initial.frozen)
    path, var = next((p, v) for p, v in flat if "vision_tower" in path_str(p))
    var.set_value(var.get_value().at[0].add(1e-3))  # e.g. another --config.init_from
    with pytest.raises(ValueError, match="frozen parameters differ.*" + path_str(path)):
        ckpt.restore(with_shardings(abstract, shardings), initial._replace(frozen=flat.to_nested_state()),
                     step=STEPS)


def test_resume_refuses_the_older_layout_by_name(tmp_path):
    old = Checkpointer(str(tmp_path), keep=1, every_steps=1, async_save=False)
    old.manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"step": jnp.zeros((), jnp.int32)})))
    old.wait()
    with pytest.raises(ValueError, match="older layout"):
        old.restore(None, None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_frozen_fingerprint_ignores_sharding_and_sees_every_element(dtype):
    x = jax.random.normal(jax.random.key(0), (64, 48), dtype)
    one = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
    eight = sharding.make_mesh({"fsdp": 8})
    spread = jax.device_put(x, jax.sharding.NamedSharding(eight, jax.sharding.PartitionSpec("fsdp")))
    want = np.asarray(frozen_fingerprint({"w": x}, one))
    np.testing.assert_array_equal(np.asarray(frozen_fingerprint({"w": spread}, eight)), want)
    swapped = x.at[0, 0].set(x[1, 0]).at[1, 0].set(x[0, 0])  # same values, other places
    assert not np.array_equal(np.asarray(frozen_fingerprint({"w": swapped}, one)), want)
    lowest_bit = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}")) ^ 1
    flipped = jax.lax.bitcast_convert_type(lowest_bit, x.dtype)
    assert not np.array_equal(np.asarray(frozen_fingerprint({"w": flipped}, one)), want)


def _truncate_array_files(step_dir):
    """Cuts every array data file of a saved step in half (as a full disk would)."""
    for d, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(d) == "d":
            for name in files:
                with open(os.path.join(d, name), "r+b") as f:
                    f.truncate(os.path.getsize(os.path.join(d, name)) // 2)


@pytest.mark.slow
def test_resume_over_a_damaged_latest_step_falls_back_and_ends_bit_identical(tmp_path, dataset, uninterrupted):
    import shutil

    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    for step in (STEPS, STEPS - 2):  # as if the run had stopped after step 8, whose file was then cut
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
    _truncate_array_files(tmp_path / "checkpoints" / str(STEPS - 4))
    run = subprocess.run(command(tmp_path, dataset), cwd=ROOT, env=env(), timeout=600,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"checkpoint step {STEPS - 4} in" in run.stderr and "damaged" in run.stderr
    assert f"resuming from step {STEPS - 6}" in run.stderr
    assert (tmp_path / "checkpoints.damaged" / str(STEPS - 4)).is_dir()
    want, got = saved_state(uninterrupted, STEPS), saved_state(tmp_path, STEPS)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_resume_with_every_step_damaged_is_one_error_line(tmp_path, dataset, uninterrupted):
    import shutil

    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    for step in finished_steps(tmp_path / "checkpoints"):
        _truncate_array_files(tmp_path / "checkpoints" / str(step))
    run = subprocess.run(command(tmp_path, dataset), cwd=ROOT, env=env(), timeout=600,
                         capture_output=True, text=True)
    assert run.returncode == 2, run.stderr[-3000:]
    last = [line for line in run.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: every checkpoint step in") and "damaged" in last, run.stderr[-3000:]
    assert "Traceback" not in run.stderr


def test_unretrieved_read_errors_of_a_damaged_step_go_to_the_debug_log(caplog):
    """asyncio logs a failed orbax task when it is garbage collected, at a moment no test can
    choose; this makes that moment happen here, for a tensorstore read error and another one."""
    import asyncio
    import gc
    import logging

    from safevlm_jax.train.checkpointing import _UnretrievedReadErrors

    def unretrieved(message):
        loop = asyncio.new_event_loop()
        future = loop.create_future()
        future.set_exception(ValueError(message))
        loop.close()
        del future
        gc.collect()

    quiet = _UnretrievedReadErrors()
    logging.getLogger("asyncio").addFilter(quiet)
    try:
        with caplog.at_level(logging.DEBUG):
            unretrieved('OUT_OF_RANGE: Error opening "zarr" driver [tensorstore_spec=\'{}\']')
            unretrieved("an unrelated failure")
    finally:
        logging.getLogger("asyncio").removeFilter(quiet)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.exc_info[1].args[0] for r in errors] == ["an unrelated failure"]
    assert any("after a damaged checkpoint read" in r.getMessage() and "zarr" in r.getMessage()
               for r in caplog.records if r.levelno == logging.DEBUG)
