"""`python -m safevlm_jax.plan`: compile a program for a target slice here, print its plan.

    python -m safevlm_jax.plan --config configs/stage2.py:7b --target v5e-8
    python -m safevlm_jax.plan --config configs/stage2.py:7b --target v5p-64 --program prefill --length 1024
    python -m safevlm_jax.plan --config configs/stage2.py:7b --target cpu:8      # fake CPU devices

The command puts this process on the CPU platform itself; a TPU target needs libtpu (the
`tpu` extra). Config overrides work as in training (`--config.batch_per_device=8
--config.accumulation=2`, `--config.model.attention=xla`, `--config.model.remat_policy=...`).
Figures are the compiler's (docs/tpu.md).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from safevlm_jax import cli
from safevlm_jax.plan import format_plan, make_plan, programs, targets
from safevlm_jax.sharding import parse_mesh

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "training config FILE.py:PRESET", flag_values=FLAGS)
_TARGET = flags.DEFINE_string("target", "cpu:8", "v5e-8, v5p-64, v6e-8, a topology such as v5e:2x4, or cpu:N",
                              flag_values=FLAGS)
_PROGRAM = flags.DEFINE_enum("program", "train", programs.PROGRAMS, "what to compile", flag_values=FLAGS)
_MESH = flags.DEFINE_string("mesh", "", "mesh axes, e.g. fsdp=8, data=2,fsdp=4 or tensor=4 (default: the "
                            "config's for train, tensor=-1 for serving)", flag_values=FLAGS)
_RULES = flags.DEFINE_string("rules", "", "rule set (default: the config's for train, inference for serving)",
                             flag_values=FLAGS)
_HBM = flags.DEFINE_float("hbm_gib", None, "memory per chip to check against (default: the chip's HBM)",
                          flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch", None, "encode: images (default: one per chip)", flag_values=FLAGS)
_LENGTH = flags.DEFINE_integer("length", None, "prefill: the prompt bucket (default: the config's max_length)",
                               flag_values=FLAGS)
_SLOTS = flags.DEFINE_integer("slots", 8, "decode: rows of the decode state (the batch)", flag_values=FLAGS)
_MAX_LEN = flags.DEFINE_integer("max_len", 4096, "decode: cache slots per row", flag_values=FLAGS)
flags.mark_flag_as_required("config", flag_values=FLAGS)


def _main(argv) -> None:
    del argv
    name = _TARGET.value
    cpu = targets.topology_name(name) is None  # also checks the name before JAX starts
    targets.use_cpu_platform(int(name.split(":")[1]) if cpu else None)
    plan = make_plan(_CONFIG.value, targets.get_target(name), _PROGRAM.value, parse_mesh(_MESH.value) or None,
                     _RULES.value or None, _HBM.value, batch=_BATCH.value, length=_LENGTH.value,
                     slots=_SLOTS.value, max_len=_MAX_LEN.value)
    print(format_plan(plan))


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    main()
