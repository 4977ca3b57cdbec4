"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

  explicit   --coordinator HOST:PORT --num_processes N --process_id I  (any cluster, tests)
  TPU pod    nothing to pass: each TPU VM worker finds the others (TPU metadata)
  SLURM      nothing to pass inside `srun`: SLURM_* variables give coordinator, count, rank
  one host   nothing happens
"""

from __future__ import annotations

import os

import jax


def cluster_detected(env=os.environ) -> bool:
    """True on a multi-worker TPU slice, inside a multi-task SLURM step, or when JAX's own
    coordinator variables are set."""
    tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return ("," in tpu_hosts or int(env.get("SLURM_NTASKS", "1")) > 1
            or "JAX_COORDINATOR_ADDRESS" in env)


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
               local_device_ids: list[int] | None = None) -> None:
    """Joins the job; a no-op for a single process. Call before any other JAX call."""
    if coordinator:
        if num_processes <= 0 or process_id < 0:
            raise ValueError("--coordinator needs --num_processes > 0 and --process_id >= 0")
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   local_device_ids=local_device_ids)
    elif cluster_detected():
        jax.distributed.initialize()  # cluster auto-detection (TPU, SLURM, env variables)

