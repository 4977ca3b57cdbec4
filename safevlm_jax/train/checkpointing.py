"""Training checkpoints: orbax CheckpointManager (async, keep-last-k) in WORKDIR/checkpoints.

Each step directory holds `state` (the whole TrainState: step, trainable and frozen params,
optimizer state, RNG key data — sharded arrays, written by every host for its shards) and
`data` (the grain iterator state, one JSON file per process). Orbax finalises a step only
when every item is written, so a run killed at any moment resumes from the last complete
step. Restoring takes the target shardings, so a checkpoint loads onto any mesh.
"""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp

from safevlm_jax.train.state import TrainState


class Checkpointer:
    """`save(step, state, data_iter)` every `every_steps`; `restore(abstract, data_iter)`."""

    def __init__(self, directory: str, *, keep: int, every_steps: int, async_save: bool):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every_steps,
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_iter, force: bool = False) -> bool:
        """Saves if `step` is due (or `force`); async saves return before the write ends."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)),
            force=force)

    def restore(self, abstract: TrainState, data_iter=None, step: int | None = None) -> TrainState:
        """The TrainState of `step` (default: latest) placed as `abstract`'s ShapeDtypeStructs
        (with shardings) say; `data_iter`, if given, is set to the saved position in place."""
        step = self.latest_step() if step is None else step
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

