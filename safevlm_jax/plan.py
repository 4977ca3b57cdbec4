"""AOT memory plan: compile the train step for a target mesh on fake CPU devices.

  python -m safevlm_jax.plan --config configs/stage2.py:7b --mesh fsdp=64 --hbm_gib 16

Nothing is allocated: the state and batch are ShapeDtypeStructs with their shardings, the
step is `jax.jit(...).lower(...).compile()`d, and XLA's `memory_analysis()` gives the
per-device argument / temporary (activations, gradients, workspace) / output bytes.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from safevlm_jax import cli
from safevlm_jax.sharding import parse_mesh

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "training config FILE.py:PRESET", flag_values=FLAGS)
_MESH = flags.DEFINE_string("mesh", "fsdp=8", "mesh axes, e.g. fsdp=64 or data=2,fsdp=4,tensor=8",
                            flag_values=FLAGS)
_HBM = flags.DEFINE_float("hbm_gib", 16.0, "device memory to check the plan against (GiB)", flag_values=FLAGS)
_RULES = flags.DEFINE_string("rules", "", "rule set (default: the config's)", flag_values=FLAGS)
flags.mark_flag_as_required("config", flag_values=FLAGS)

GIB = 2**30


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def plan(cfg, mesh_shape: dict[str, int], rules: str | None = None) -> dict[str, float]:
    """Compiles the train step of `cfg` for a mesh of `mesh_shape`; returns byte counts."""
    from safevlm_jax import sharding
    from safevlm_jax.config import ModelConfig
    from safevlm_jax.train.loop import model_factory
    from safevlm_jax.train.optimizer import make_optimizer
    from safevlm_jax.train.state import abstract_state, with_shardings
    from safevlm_jax.train.step import batch_shardings, jit_train_step, make_train_step

    rules = rules or cfg.rules
    mcfg = ModelConfig.from_dict(cfg.model)
    mesh = sharding.make_mesh(mesh_shape)
    optimizer, schedule = make_optimizer(cfg.optimizer, 1000)
    graphdef, abstract = abstract_state(model_factory(mcfg, cfg.seed), cfg, optimizer)
    rows = cfg.batch_per_device * mesh.size * cfg.accumulation
    t, size = cfg.data.max_length, mcfg.vision.image_size
    batch = {k: jax.ShapeDtypeStruct((rows, t), np.int32) for k in ("input_ids", "labels", "attention_mask")}
    batch["pixel_values"] = jax.ShapeDtypeStruct((rows, size, size, 3), np.float32)
    batch.update({k: jax.ShapeDtypeStruct((rows,), np.int32) for k in ("safe_level", "safe_type")})
    step = make_train_step(graphdef, optimizer, schedule, accumulation=cfg.accumulation,
                           head_weight=cfg.head_weight)
    fn, state_sh, batch_sh = jit_train_step(step, abstract, batch, mesh, rules, cfg.sharding_fallback)
    state_in = with_shardings(abstract, state_sh)
    batch_in = with_shardings(batch, batch_shardings(batch, mesh, rules))
    mem = fn.lower(state_in, batch_in).compile().memory_analysis()
    out = {
        "trainable_params": per_device_bytes(state_in.trainable),
        "frozen_params": per_device_bytes(state_in.frozen),
        "optimizer_state": per_device_bytes(state_in.opt_state),
        "batch": per_device_bytes(batch_in),
        "arguments": mem.argument_size_in_bytes,
        "temp (activations, grads, workspace)": mem.temp_size_in_bytes,
        "outputs not aliased": mem.output_size_in_bytes - mem.alias_size_in_bytes,
    }
    out["total"] = out["arguments"] + out["temp (activations, grads, workspace)"] + out["outputs not aliased"]
    return out


def print_report(cfg, mesh_shape: dict[str, int], rules: str | None, hbm_gib: float) -> bool:
    """Prints the per-device table of `plan` and whether it fits `hbm_gib`; returns that."""
    result = plan(cfg, mesh_shape, rules)
    print(f"mesh {mesh_shape}, rules {rules or cfg.rules}, batch/device {cfg.batch_per_device} "
          f"x accumulation {cfg.accumulation}, length {cfg.data.max_length}")
    print(f"{'per device':<40}{'MiB':>12}{'GiB':>10}")
    for name, value in result.items():
        print(f"{name:<40}{value / 2**20:>12.1f}{value / GIB:>10.3f}")
    fits = result["total"] <= hbm_gib * GIB
    print(f"fits {hbm_gib:g} GiB: {'yes' if fits else 'no'}")
    return fits


def _main(argv) -> None:
    del argv
    mesh_shape = parse_mesh(_MESH.value)
    # fake exactly the mesh's devices on the host CPU (before any JAX computation)
    jax.config.update("jax_num_cpu_devices", math.prod(mesh_shape.values()))
    jax.config.update("jax_platforms", "cpu")
    print_report(_CONFIG.value, mesh_shape, _RULES.value or None, _HBM.value)


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    main()
