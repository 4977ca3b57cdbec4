"""Command line: `python -m safevlm_jax.train --config configs/stage1.py:tiny --workdir DIR`.

Any config field can be overridden: `--config.optimizer.lr=2e-5 --config.mesh.fsdp=8`.
Multi-process: launch the same command on every host (launch/*.sh); TPU pods and SLURM are
detected, elsewhere pass `--coordinator HOST:PORT --num_processes N --process_id I`.
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from safevlm_jax import cli
from safevlm_jax.checkpoint.io import is_primary
from safevlm_jax.train import distributed

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "training config: FILE.py:PRESET",
                                          flag_values=FLAGS, lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard logs, export", required=True,
                               flag_values=FLAGS)
_COORDINATOR = flags.DEFINE_string("coordinator", "", "HOST:PORT of process 0 (explicit multi-process)",
                                   flag_values=FLAGS)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "number of processes (with --coordinator)",
                                      flag_values=FLAGS)
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "this process's index (with --coordinator)",
                                   flag_values=FLAGS)
flags.mark_flag_as_required("config", flag_values=FLAGS)


def _main(argv) -> None:
    del argv
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from safevlm_jax.train.loop import train  # after initialize: it touches jax devices

    metrics = train(_CONFIG.value, _WORKDIR.value)
    if is_primary():
        print(json.dumps(metrics, sort_keys=True))


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    main()
