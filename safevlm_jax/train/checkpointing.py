"""Training checkpoints: orbax CheckpointManager (async, keep-last-k) in WORKDIR/checkpoints.

Each step directory holds `state` and `data` (the grain iterator state, one JSON file per
process). `state` is what training changes: step, trainable params, optimizer state, RNG key
data and the frozen non-parameter variables (RNG streams), as sharded arrays written by every
host for its shards. Frozen parameters are not stored (at 7B they would be 14 GB a step):
resuming rebuilds them as the run began (init + `init_from`) and checks them against the
`frozen_fingerprint` stored with the step, so a changed `init_from` is an error, not a silently
different model. Orbax finalises a step only when every item is written, so a run killed at
any moment resumes from the last complete step. A step damaged later on disk (a truncated or
missing array file) is moved aside to `WORKDIR/checkpoints.damaged/STEP` with a warning, and
the run resumes from the newest intact step (keep-last-k keeps older ones). Restoring takes
the target shardings, so a checkpoint loads onto any mesh.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from safevlm_jax.checkpoint.io import is_primary, path_str
from safevlm_jax.train.state import TrainState

_GOLDEN = np.uint32(0x9E3779B1)
_log = logging.getLogger(__name__)


def split_frozen(frozen):
    """frozen State -> (its Params, the rest: RNG stream variables)."""
    return nnx.split_state(frozen, nnx.Param, ...)


def _leaf_hash(x: jax.Array) -> jax.Array:
    """uint32 []: sum over elements of bits(x[i]) * odd(i), wrapping. Integer sums are
    associative, so the value is the same for any sharding or reduction order."""
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))
    index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
    return jnp.sum(bits.astype(jnp.uint32) * (index * _GOLDEN | 1), dtype=jnp.uint32)


def frozen_fingerprint(frozen_params, mesh: jax.sharding.Mesh) -> jax.Array:
    """uint32 [number of frozen params, at least 1]: one hash per leaf in tree order (see
    `_leaf_hash`), replicated over `mesh` (every process holds it)."""
    hashes = lambda tree: jnp.stack([_leaf_hash(x) for x in jax.tree.leaves(tree)]
                                    or [jnp.zeros((), jnp.uint32)])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(hashes, out_shardings=replicated)(frozen_params)


def _mesh(state: TrainState) -> jax.sharding.Mesh:
    """The mesh the state's arrays (or ShapeDtypeStructs) are sharded over."""
    return jax.tree.leaves(state.trainable)[0].sharding.mesh


def _saved(state: TrainState, fingerprint) -> dict:
    """The `state` item of a step: `state` less its frozen params, plus their fingerprint."""
    return {"train": state._replace(frozen=split_frozen(state.frozen)[1]),
            "frozen_fingerprint": fingerprint}


class DamagedStep(Exception):
    """A saved step whose files cannot be read back (truncated, missing or corrupt)."""


# What orbax's leftovers of a failed read say: its own wrapper, a closed loop, and the
# tensorstore error itself (every tensorstore error carries its spec).
_ORBAX_READ_NOISE = ("Encountered error while reading array", "Event loop is closed",
                     "tensorstore_spec=")


def _is_read_noise(exc) -> bool:
    return exc is not None and any(m in str(exc) for m in _ORBAX_READ_NOISE)


class _UnretrievedReadErrors(logging.Filter):
    """Demotes asyncio's "Task/Future exception was never retrieved" records (logged when an
    orbax task that failed reading a damaged step is garbage collected) to the debug log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno >= logging.ERROR and _is_read_noise(exc):
            _log.debug("after a damaged checkpoint read: %s", exc)
            return False
        return True


def _quiet_failed_reads() -> None:
    """A failed read leaves orbax coroutines, futures and threads that fail during and after
    it, each printing a traceback of the error already reported (through `sys.unraisablehook`,
    `threading.excepthook` and asyncio's logger); route just those messages to the debug log
    (installed once per process, before the first restore; any other error still reaches the
    original hooks)."""
    if getattr(sys.unraisablehook, "safevlm_quiet", False):
        return
    logging.getLogger("asyncio").addFilter(_UnretrievedReadErrors())
    unraisable, thread_hook = sys.unraisablehook, threading.excepthook

    def on_unraisable(args):
        if _is_read_noise(args.exc_value):
            _log.debug("after a damaged checkpoint read: %s", args.exc_value)
        else:
            unraisable(args)

    def on_thread(args):
        if _is_read_noise(args.exc_value):
            _log.debug("after a damaged checkpoint read: %s", args.exc_value)
        else:
            thread_hook(args)

    on_unraisable.safevlm_quiet = True
    sys.unraisablehook, threading.excepthook = on_unraisable, on_thread


class Checkpointer:
    """`save(step, state, data_iter)` every `every_steps`; `restore(abstract, initial, data_iter)`."""

    def __init__(self, directory: str, *, keep: int, every_steps: int, async_save: bool):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every_steps,
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                             item_names=("state", "data"))
        self._fingerprint = None  # the frozen params never change during a run

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_iter, force: bool = False) -> bool:
        """Saves if `step` is due (or `force`); async saves return before the write ends."""
        if not (force or self.manager.should_save(step)):
            return False
        if self._fingerprint is None:
            self._fingerprint = frozen_fingerprint(split_frozen(state.frozen)[0], _mesh(state))
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_saved(state, self._fingerprint)),
            data=grain.checkpoint.CheckpointSave(data_iter)), force=force)

    def restore(self, abstract: TrainState, initial: TrainState, data_iter=None,
                step: int | None = None) -> TrainState:
        """The TrainState of `step` (default: the newest intact one) placed as `abstract`'s
        ShapeDtypeStructs (with shardings) say, with the frozen params of `initial` (the run's
        first state, built as a fresh run builds it). Raises if those differ from the ones the
        step was trained with. `data_iter`, if given, is set to the saved position in place.

        Without `step`, a step that cannot be read is moved aside (`damaged_dir`) with a
        warning naming it and the next older one is tried; with every step damaged, or a
        given `step` damaged, it is a ValueError naming the steps.
        """
        if step is not None:
            try:
                return self._restore(step, abstract, initial, data_iter)
            except DamagedStep as e:
                raise ValueError(f"checkpoint step {step} in {self.manager.directory} is damaged: {e}") from e
        damaged, reasons = [], []
        for candidate in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self._restore(candidate, abstract, initial, data_iter)
            except DamagedStep as e:
                _log.warning("checkpoint step %d in %s is damaged (%s); trying an older step",
                             candidate, self.manager.directory, e)
                damaged.append(candidate)
                reasons.append(str(e))
                continue
            self._set_aside(damaged)
            return state
        raise ValueError(f"every checkpoint step in {self.manager.directory} is damaged "
                         f"({', '.join(map(str, damaged))}; newest: {reasons[0] if reasons else 'none'}): "
                         "start a new --workdir, or restore the files")

    @property
    def damaged_dir(self) -> str:
        return os.fspath(self.manager.directory).rstrip("/") + ".damaged"

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged steps out of the manager's directory (so the run saves them anew),
        keeping their files for inspection."""
        if not steps:
            return
        if is_primary():
            os.makedirs(self.damaged_dir, exist_ok=True)
            for s in steps:
                target = os.path.join(self.damaged_dir, str(s))
                shutil.rmtree(target, ignore_errors=True)
                shutil.move(os.path.join(os.fspath(self.manager.directory), str(s)), target)
            _log.warning("moved damaged checkpoint step(s) %s to %s", steps, self.damaged_dir)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("safevlm_damaged_steps_moved")
        self.manager.reload()

    def _restore(self, step: int, abstract: TrainState, initial: TrainState, data_iter) -> TrainState:
        try:
            stored = self.manager.item_metadata(step)["state"]
        except (OSError, ValueError, KeyError) as e:  # unreadable metadata
            raise DamagedStep(f"{type(e).__name__}: {e}") from e
        if stored is not None and "frozen_fingerprint" not in stored.keys():
            raise ValueError(f"step {step} in {self.manager.directory} has the older layout (frozen params "
                             "inside `state`): resume it with the safevlm_jax version that wrote it, or "
                             "start a new --workdir")
        frozen_params = split_frozen(initial.frozen)[0]
        self._fingerprint = got = frozen_fingerprint(frozen_params, _mesh(abstract))
        target = _saved(abstract, jax.ShapeDtypeStruct(got.shape, got.dtype, sharding=got.sharding))
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        _quiet_failed_reads()  # before the read: its threads may fail while it is still running
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
        except Exception as e:  # orbax reports a truncated or missing array file as a bare Exception
            raise DamagedStep(" ".join(str(e).split())[:300] or type(e).__name__) from e
        want, got = np.asarray(saved["frozen_fingerprint"]), np.asarray(got)
        if not np.array_equal(want, got):
            names = [path_str(p) for p, _ in nnx.to_flat_state(frozen_params)]
            differ = [n for n, a, b in zip(names, want, got) if a != b]
            raise ValueError(
                f"the frozen parameters differ from those step {step} of {self.manager.directory} "
                f"was trained with ({len(differ)} of {len(names)}, e.g. {differ[:3]}): resume with "
                "the same --config.init_from, seed, model and frozen_dtype as the run began with")
        train = saved["train"]
        return train._replace(frozen=nnx.merge_state(frozen_params, train.frozen))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
