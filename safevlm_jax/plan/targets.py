"""Compile targets: the devices a plan compiles for, and the published figures of their chips.

A target is a TPU slice by its Cloud name (`v5e-8`, `v5p-64`, `v6e-8`), a TPU topology as
`jax.experimental.topologies.get_topology_desc` names it (`v5e:2x4`, `v5p:2x4x4`), or `cpu:N`
(N fake CPU devices). TPU devices come from libtpu as compile-only devices: nothing runs on
them, but `jax.jit(...).lower(...).compile()` over a mesh of them runs the real TPU compiler
on a CPU host. The process must use the CPU platform (`use_cpu_platform`) so that JAX does not
try to open a TPU.

CHIPS holds each chip's bf16 peak, HBM bandwidth and HBM size as Google publishes them
(docs/tpu.md lists the pages).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Sequence

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures: bf16 peak FLOP/s, HBM bytes/s, HBM GiB."""

    name: str
    peak_flops: float
    hbm_bandwidth: float
    hbm_gib: float


# by `device_kind` (what libtpu calls the chip)
CHIPS = {
    "TPU v5 lite": Chip("v5e", 197e12, 819e9, 16.0),
    "TPU v5": Chip("v5p", 459e12, 2765e9, 95.0),
    "TPU v6 lite": Chip("v6e", 918e12, 1638e9, 32.0),
}
# Cloud slice name -> topology (v5p names count TensorCores, two per chip; v5e/v6e count chips)
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SLICE = re.compile(r"^(v5e|v5litepod|v5p|v6e)-(\d+)$")
_TOPOLOGY = re.compile(r"^(v\w+):(\d+(x\d+)+)$")
EXTRA = 'pip install -e ".[tpu]"'


@dataclasses.dataclass(frozen=True)
class Target:
    """name: as given; topology: what libtpu was asked for (None for cpu:N); devices: the
    compile-only devices, one per chip; chip: its published figures (None when unknown)."""

    name: str
    topology: str | None
    devices: Sequence
    chip: Chip | None

    @property
    def platform(self) -> str:
        return self.devices[0].platform


def topology_name(target: str) -> str | None:
    """'v5e-8' -> 'v5e:2x4', 'v5p-64' -> 'v5p:2x4x4', 'v5e:2x4' stays; 'cpu:N' -> None."""
    if re.fullmatch(r"cpu:\d+", target):
        return None
    if _TOPOLOGY.match(target):
        return target
    m = _SLICE.match(target)
    if not m:
        raise ValueError(f"--target {target!r}: expected a TPU slice (v5e-8, v5p-64, v6e-8), a topology "
                         f"(v5e:2x4, v5p:2x4x4) or cpu:N")
    kind, n = m.group(1), int(m.group(2))
    kind = "v5e" if kind == "v5litepod" else kind
    chips = n // 2 if kind == "v5p" else n
    grid = (_GRID_3D if kind == "v5p" else _GRID_2D).get(chips)
    if grid is None or (kind == "v5p" and n % 2):
        raise ValueError(f"--target {target!r}: no {kind} slice of {n} {'cores' if kind == 'v5p' else 'chips'}; "
                         f"name its topology instead (e.g. {kind}:2x4)")
    return f"{kind}:{grid}"


def accelerator_type(topology: str) -> str:
    """'v5e:2x4' -> 'v5litepod-8', 'v5p:2x4x4' -> 'v5p-64', 'v6e:2x4' -> 'v6e-8' (Cloud names)."""
    kind, grid = topology.split(":")
    chips = 1
    for n in grid.split("x"):
        chips *= int(n)
    return {"v5e": f"v5litepod-{chips}", "v5p": f"v5p-{2 * chips}"}.get(kind, f"{kind}-{chips}")


def use_cpu_platform(num_cpu_devices: int | None = None) -> None:
    """This process on the CPU platform (before any JAX computation): JAX opens no TPU."""
    jax.config.update("jax_platforms", "cpu")
    if num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", num_cpu_devices)


def get_target(target: str) -> Target:
    """The devices of `target` (see the module docstring); libtpu missing is a ValueError
    naming the extra that installs it."""
    topology = topology_name(target)
    if topology is None:
        n = int(target.split(":")[1])
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ValueError(f"--target {target}: this process has {len(devices)} CPU devices (set "
                             f"jax_num_cpu_devices before JAX starts: use_cpu_platform({n}))")
        return Target(target, None, devices[:n], None)
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"--target {target} compiles with the TPU compiler, which libtpu provides: {EXTRA}")
    from jax.experimental import topologies

    # libtpu looks for the slice's workers and its type unless told: this host is the only one;
    # and it locks /tmp/libtpu_lockfile for the one process that may drive the chips, while
    # compile-only devices drive nothing: other processes may compile at the same time
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(topology))
    try:
        devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as e:  # libtpu's own error, e.g. an unknown chip name
        raise ValueError(f"--target {target}: libtpu has no topology {topology!r}: {str(e).splitlines()[0]}") from e
    return Target(target, topology, devices, CHIPS.get(devices[0].device_kind))
