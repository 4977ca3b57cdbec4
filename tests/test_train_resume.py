"""Checkpoints: two runs of the same seed in separate processes, each building its own data,
save bit-identical states; a run killed with SIGKILL and resumed ends bit-identical to an
uninterrupted run; a checkpoint restores onto another device count; steps store no frozen
params, and a resume over other frozen params is refused; stage 2 starts from a stage-1 export.

The training runs (real `python -m safevlm_jax.train` processes) are module fixtures shared by
the tests: one uninterrupted run, one killed run, and one resume per resume property."""

import json
import os
import shutil
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
from safevlm_jax.checkpoint.format import restore_params
from safevlm_jax.checkpoint.io import path_str
from safevlm_jax.config import ModelConfig
from safevlm_jax.train.checkpointing import Checkpointer, frozen_fingerprint, split_frozen
from safevlm_jax.train.data import READY
from safevlm_jax.train.init import load_params
from safevlm_jax.train.loop import model_factory
from safevlm_jax.train.optimizer import make_optimizer
from safevlm_jax.train.state import abstract_state, with_shardings

from train_helpers import read_state, tiny_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6  # saved: steps 1 (the first), 2, 4, 6


def command(workdir, *extra):
    """The training command: stage 1, tiny, a checkpoint every 2 steps, synthetic data built
    from the seed under WORKDIR/synthetic unless `extra` names a dataset."""
    return [sys.executable, "-m", "safevlm_jax.train", "--config", "configs/stage1.py:tiny",
            "--workdir", str(workdir), f"--config.total_steps={STEPS}", "--config.data.synthetic_examples=32",
            "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=10", *extra]


def finished_steps(ckpt_dir):
    return [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []


def saved_state(workdir, step):
    tree = read_state(os.path.join(workdir, "checkpoints", str(step), "state"))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_state(got: dict, want: dict):
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def wait_for_a_saved_step(workdir, proc) -> None:
    deadline = time.time() + 600
    while not finished_steps(workdir / "checkpoints") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory, cli_env):
    """((workdir, stdout) of a run of STEPS steps, (workdir, last finished step) of a run killed
    with SIGKILL once it saved a step). The second starts once the first saved a step, so it
    finds the first's compiled programs in the compilation cache, and then runs beside it."""
    full, part = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("killed")
    run = subprocess.Popen(command(full), cwd=ROOT, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    wait_for_a_saved_step(full, run)
    victim = subprocess.Popen(command(part), cwd=ROOT, env=cli_env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_for_a_saved_step(part, victim)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(finished_steps(part / "checkpoints"))
    assert killed_at < STEPS
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    return (full, stdout), (part, killed_at)


@pytest.fixture(scope="module")
def uninterrupted(first_runs):
    return first_runs[0]


@pytest.fixture(scope="module")
def killed(first_runs):
    return first_runs[1]


def same_data(workdir) -> list[str]:
    """Flags that point a run at the synthetic data (and tokenizer) built in `workdir`."""
    with open(workdir / "synthetic" / READY) as f:
        dataset_dir = f.read().strip()
    tokenizer = workdir / "synthetic" / "tokenizer"
    return [f"--config.data.dataset_dir={dataset_dir}", f"--config.data.tokenizer={tokenizer}"]


def _truncate_array_files(step_dir):
    """Cuts every array data file of a saved step in half (as a full disk would)."""
    for d, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(d) == "d":
            for name in files:
                with open(os.path.join(d, name), "r+b") as f:
                    f.truncate(os.path.getsize(os.path.join(d, name)) // 2)


@pytest.fixture(scope="module")
def resumed(first_runs, tmp_path_factory, cli_env):
    """One resume per property, run side by side: {scenario: (workdir, exit status, stderr)}.
    killed: the killed run, as it was left; latest_damaged: the uninterrupted run's steps as
    if it had stopped after step STEPS - 2, whose array files were then cut; all_damaged: every
    step's array files cut."""
    (full, _), (killed_dir, _) = first_runs
    latest, every = tmp_path_factory.mktemp("latest_damaged"), tmp_path_factory.mktemp("all_damaged")
    for workdir in (latest, every):
        shutil.copytree(full / "checkpoints", workdir / "checkpoints")
    shutil.rmtree(latest / "checkpoints" / str(STEPS))
    _truncate_array_files(latest / "checkpoints" / str(STEPS - 2))
    for step in finished_steps(every / "checkpoints"):
        _truncate_array_files(every / "checkpoints" / str(step))
    no_export = ["--config.export=false"]  # what these tests read is the checkpoints
    runs = {"killed": (killed_dir, no_export), "latest_damaged": (latest, same_data(full) + no_export),
            "all_damaged": (every, same_data(full))}
    logs = tmp_path_factory.mktemp("resume_logs")  # files, not pipes: nothing waits on a full pipe
    procs = {}
    for name, (workdir, extra) in runs.items():
        with open(logs / name, "w") as stderr:
            procs[name] = subprocess.Popen(command(workdir, *extra), cwd=ROOT, env=cli_env,
                                           stdout=subprocess.DEVNULL, stderr=stderr)
    for proc in procs.values():
        proc.wait(timeout=600)
    return {name: (runs[name][0], proc.returncode, (logs / name).read_text()) for name, proc in procs.items()}


def test_train_command_prints_only_the_final_metrics(uninterrupted):
    _, stdout = uninterrupted
    [line] = stdout.splitlines()
    assert json.loads(line)["loss"] > 0


def test_same_seed_in_separate_processes_saves_bit_identical_states(uninterrupted, killed):
    """Each run built its own synthetic data and tokenizer from the seed and its own init."""
    (full, _), (other, step) = uninterrupted, killed
    assert_same_state(saved_state(other, step), saved_state(full, step))


def test_sigkill_then_resume_is_bit_identical(uninterrupted, resumed):
    full, _ = uninterrupted
    workdir, code, stderr = resumed["killed"]
    assert code == 0, stderr[-3000:]
    assert_same_state(saved_state(workdir, STEPS), saved_state(full, STEPS))


def test_resume_over_a_damaged_latest_step_falls_back_and_ends_bit_identical(uninterrupted, resumed):
    full, _ = uninterrupted
    workdir, code, stderr = resumed["latest_damaged"]
    assert code == 0, stderr[-3000:]
    assert f"checkpoint step {STEPS - 2} in" in stderr and "damaged" in stderr
    assert f"resuming from step {STEPS - 4}" in stderr
    assert (workdir / "checkpoints.damaged" / str(STEPS - 2)).is_dir()
    assert_same_state(saved_state(workdir, STEPS), saved_state(full, STEPS))


def test_resume_with_every_step_damaged_is_one_error_line(resumed):
    _, code, stderr = resumed["all_damaged"]
    assert code == 2, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: every checkpoint step in") and "damaged" in last, stderr[-3000:]
    assert "Traceback" not in stderr


@pytest.fixture(scope="module")
def restorable(uninterrupted):
    """(abstract state, 8-device shardings, the run's frozen params in them) to restore into.
    The frozen params are read from the run's export (training never changes them, and
    `restore` refuses any others by their fingerprint): no init program is compiled here."""
    workdir, _ = uninterrupted
    cfg = tiny_train_config(1)
    mcfg = ModelConfig.from_dict(cfg.model)
    optimizer, _ = make_optimizer(cfg.optimizer, STEPS)
    _, abstract = abstract_state(model_factory(mcfg, cfg.seed), cfg, optimizer)
    shardings = sharding.state_shardings(abstract, sharding.make_mesh({"fsdp": 8}), "fsdp")
    return abstract, shardings, restore_params(str(workdir / "export"), abstract.frozen, shardings.frozen)


def test_restore_onto_a_different_device_count(uninterrupted, restorable):
    workdir, _ = uninterrupted
    abstract, eight, frozen = restorable
    two = sharding.state_shardings(abstract, sharding.make_mesh({"fsdp": 2}, jax.devices()[:2]), "fsdp")
    ckpt = Checkpointer(str(workdir / "checkpoints"), keep=10, every_steps=2, async_save=False)
    values = []
    for n, shardings in ((8, eight), (2, two)):
        initial = abstract._replace(frozen=jax.device_put(frozen, shardings.frozen))  # laid out on n devices
        state = ckpt.restore(with_shardings(abstract, shardings), initial, step=STEPS)
        assert int(state.step) == STEPS
        leaf = jax.tree.leaves(state.trainable)[0]
        assert len(leaf.sharding.device_set) == n
        values.append([np.asarray(x) for x in jax.tree.leaves(state)])
    for a, b in zip(*values):
        np.testing.assert_array_equal(a, b)


def test_stage2_starts_from_the_stage1_export(uninterrupted):
    """`load_params` (what `--config.init_from` runs) replaces every frozen param by the
    export's and keeps the LoRA adapters the export lacks. The state it loads into holds random
    params, so a param left unloaded, or an adapter overwritten, shows."""
    workdir, _ = uninterrupted
    cfg = tiny_train_config(2)
    optimizer, _ = make_optimizer(cfg.optimizer, STEPS)
    _, abstract = abstract_state(model_factory(ModelConfig.from_dict(cfg.model), cfg.seed), cfg, optimizer)
    rng = np.random.default_rng(0)
    random_params = lambda tree: jax.tree.map(
        lambda v: v.replace(rng.normal(size=v.get_value().shape).astype(v.get_value().dtype)) if isinstance(v, nnx.Param) else v,
        tree, is_leaf=lambda v: isinstance(v, nnx.Variable))
    fresh = abstract._replace(trainable=random_params(abstract.trainable), frozen=random_params(abstract.frozen))
    state = load_params(fresh, str(workdir / "export"), sharding.make_mesh({"fsdp": 8}), cfg.rules)
    params = lambda tree: {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)
                           if isinstance(v, nnx.Param)}
    before, after = params(fresh.frozen), params(state.frozen)
    assert [k for k in before if np.array_equal(after[k], before[k])] == []  # every one loaded
    stage1 = saved_state(workdir, STEPS)  # safety tokens are trained (stored) in stage 1
    assert any(np.array_equal(after["safety_tokens_llm"], v) for k, v in stage1.items() if "safety_tokens_llm" in k)
    lora = params(fresh.trainable)
    assert lora and all("/lora/" in k for k in lora)
    for k, v in params(state.trainable).items():  # LoRA is not in a stage-1 export: kept
        np.testing.assert_array_equal(v, lora[k], err_msg=k)


def test_checkpoints_store_trained_state_but_no_frozen_params(uninterrupted, restorable):
    workdir, _ = uninterrupted
    abstract, _, _ = restorable
    frozen_params = split_frozen(abstract.frozen)[0]
    saved = saved_state(workdir, STEPS)
    assert saved["['frozen_fingerprint']"].shape == (len(jax.tree.leaves(frozen_params)),)
    assert not [k for k in saved if k.startswith("['train']['frozen']")]  # tiny has no RNG streams
    trained = sum(x.size for x in jax.tree.leaves((abstract.trainable, abstract.opt_state)))
    hashes, rng, step = len(jax.tree.leaves(frozen_params)), 2, 1
    assert sum(v.size for v in saved.values()) == trained + hashes + rng + step


def test_resume_refuses_other_frozen_params(uninterrupted, restorable):
    workdir, _ = uninterrupted
    abstract, shardings, frozen = restorable
    ckpt = Checkpointer(str(workdir / "checkpoints"), keep=10, every_steps=2, async_save=False)
    flat = list(nnx.to_flat_state(frozen))  # new variables: `frozen` is shared
    i, (path, var) = next((i, pv) for i, pv in enumerate(flat) if "vision_tower" in path_str(pv[0]))
    flat[i] = (path, var.replace(var.get_value().at[0].add(1e-3)))  # e.g. another --config.init_from
    other = nnx.FlatState(flat, sort=False).to_nested_state()
    with pytest.raises(ValueError, match="frozen parameters differ.*" + path_str(path)):
        ckpt.restore(with_shardings(abstract, shardings), abstract._replace(frozen=other), step=STEPS)


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
