"""The first TrainState: built directly in its shardings, optionally from a checkpoint.

`load_params` fills the parameters a library checkpoint has (any layout: scanned or not)
and keeps the fresh init of those it lacks — e.g. LoRA adapters when stage 2 starts from a
stage-1 export, or an HF import that has no LoRA.
"""

from __future__ import annotations

import jax
from flax import nnx

from safevlm_jax import sharding
from safevlm_jax.checkpoint.format import restore_params
from safevlm_jax.checkpoint.io import ParamReader, path_str, unstacked_shapes
from safevlm_jax.train.state import TrainState, create_state


def initial_state(make_model, cfg, optimizer, state_shardings) -> TrainState:
    """A fresh TrainState, each array created on its own shards (no host copy)."""
    return jax.jit(lambda: create_state(make_model(), cfg, optimizer)[1],
                   out_shardings=state_shardings)()


def load_params(state: TrainState, directory: str, mesh, rules, fallback: str = "error") -> TrainState:
    """`state` with every parameter found in checkpoint `directory` replaced by it."""
    stored = set(unstacked_shapes(ParamReader(directory).shapes))

    def in_checkpoint(path, v) -> bool:
        want = unstacked_shapes({path_str(path): v.get_value().shape})
        return isinstance(v, nnx.Param) and set(want) <= stored

    def load(tree):
        found, rest = nnx.split_state(tree, in_checkpoint, ...)
        if not jax.tree.leaves(found):
            return tree
        found = restore_params(directory, found, sharding.state_shardings(found, mesh, rules, fallback))
        return nnx.merge_state(found, rest)

    return state._replace(trainable=load(state.trainable), frozen=load(state.frozen))
