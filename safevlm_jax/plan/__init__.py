"""AOT plan: compile a program for a target slice on this host and read what the compiler says.

    python -m safevlm_jax.plan --config configs/stage2.py:7b --target v5e-8
    python -m safevlm_jax.plan --config configs/stage2.py:7b --target v5e-8 --program decode

`make_plan` compiles one program (`programs.PROGRAMS`) for a target (`targets.get_target`: a TPU
slice compiled by the real TPU compiler from compile-only devices, or fake CPU devices) and
returns its per-chip memory (`memory_analysis()`), its loop-corrected FLOPs and HBM bytes
(`hlo_cost`), the analytic FLOPs (`analytic`) and, for a chip with published figures, the
roofline: a lower bound on the step time, max(FLOPs / peak, bytes / bandwidth), and the MFU
that bound implies. All are compiler figures, never measurements (docs/tpu.md).
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax

from safevlm_jax import sharding
from safevlm_jax.plan import hlo_cost, programs
from safevlm_jax.plan.targets import Target, get_target, use_cpu_platform  # noqa: F401 (API)

GIB = 2**30


@dataclasses.dataclass
class Plan:
    """Per-chip figures of one compiled program (bytes, FLOPs per execution). A program the
    TPU compiler refused for want of HBM has `refused` (its message), the temporaries it asked
    for, and no cost figures (None)."""

    target: Target
    program: str
    shape: str
    mesh: dict[str, int]
    rules: str
    inputs: dict[str, int]
    memory: dict[str, int]
    hbm_gib: float
    flops: float | None  # loop-corrected, from the compiled HLO
    bytes: float | None
    xla_flops: float | None  # XLA's cost analysis: loop bodies once
    xla_bytes: float | None
    analytic_flops: float
    model_flops: float
    compile_s: float
    unknown_loops: list[str]
    refused: str | None = None
    host_bytes: int = 0  # what the program keeps in the host's memory (offloaded activations)
    hlo: str = dataclasses.field(repr=False, default="")

    @property
    def fits(self) -> bool:
        return self.refused is None and self.memory["total"] <= self.hbm_gib * GIB

    @property
    def bound_s(self) -> float | None:
        """Roofline lower bound on one execution's time (None without chip figures)."""
        chip = self.target.chip
        if chip is None or self.flops is None:
            return None
        return max(self.flops / chip.peak_flops, self.bytes / chip.hbm_bandwidth)

    @property
    def mfu(self) -> float | None:
        """Model FLOPs / (bound x peak): the most MFU this program can reach."""
        bound = self.bound_s
        return None if not bound else self.model_flops / (bound * self.target.chip.peak_flops)


# the TPU compiler's refusal of a program whose temporaries exceed the chip's HBM
_OUT_OF_HBM = re.compile(r"RESOURCE_EXHAUSTED: .*HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


# serving: weights split by heads and MLP, the KV cache by kv heads (`sharding.RULE_SETS`)
SERVING_MESH, SERVING_RULES = {"tensor": -1}, "inference"


def make_plan(cfg, target: Target, program: str = "train", mesh_shape: dict[str, int] | None = None,
              rules: str | None = None, hbm_gib: float | None = None, *, batch: int | None = None,
              length: int | None = None, slots: int = 8, max_len: int = 4096) -> Plan:
    """Compiles `program` of training config `cfg` for `target` (see the module docstring).
    mesh_shape / rules default to the config's for `train`, to tensor parallelism over every
    chip for the serving programs. `batch`: encode's images (default: one per chip);
    `length`: prefill's prompt bucket (default: the config's max_length); `slots` x `max_len`:
    the decode state's rows and cache slots."""
    if program not in programs.PROGRAMS:
        raise ValueError(f"--program {program!r}: expected one of {programs.PROGRAMS}")
    train = program == "train"
    mesh_shape = dict(mesh_shape or (dict(cfg.mesh) if train else SERVING_MESH))
    rules = rules or (cfg.rules if train else SERVING_RULES)
    mesh = sharding.make_mesh(mesh_shape, devices=target.devices)
    start = time.perf_counter()
    if train:
        built = programs.train(cfg, mesh, rules)
    elif program == "encode":
        built = programs.encode(cfg, mesh, rules, batch or mesh.size)
    elif program == "prefill":
        built = programs.prefill(cfg, mesh, rules, length or cfg.data.max_length)
    else:
        built = programs.decode(cfg, mesh, rules, slots, max_len)
    chip = target.chip
    hbm_gib = hbm_gib or (chip.hbm_gib if chip else 16.0)
    args = sum(built.inputs.values())
    try:
        compiled = built.lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # the compiler's own HBM check: report, do not fail
        refused = _OUT_OF_HBM.search(str(e))
        if refused is None:
            raise
        temp = int(float(refused.group(1)) * GIB)
        return Plan(target, program, built.shape, dict(mesh.shape), rules, built.inputs,
                    {"arguments": args, "temporaries": temp, "total": args + temp}, hbm_gib, None, None, None,
                    None, built.analytic_flops / mesh.size, built.model_flops / mesh.size,
                    time.perf_counter() - start, [], refused.group(0))
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    memory = {"arguments": mem.argument_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
              "outputs not aliased": mem.output_size_in_bytes - mem.alias_size_in_bytes}
    memory["total"] = sum(memory.values())
    host = mem.host_temp_size_in_bytes + mem.host_argument_size_in_bytes + mem.host_output_size_in_bytes
    text = compiled.as_text()
    cost = hlo_cost.cost(text)
    xla = compiled.cost_analysis() or {}
    return Plan(target, program, built.shape, dict(mesh.shape), rules, built.inputs, memory, hbm_gib, cost.flops,
                cost.bytes, xla.get("flops", 0.0), xla.get("bytes accessed", 0.0), built.analytic_flops / mesh.size,
                built.model_flops / mesh.size, compile_s, cost.unknown_loops, host_bytes=host, hlo=text)


def format_plan(p: Plan) -> str:
    """The report `python -m safevlm_jax.plan` prints."""
    t = p.target
    where = f"{t.name} ({t.topology}, {len(t.devices)} x {t.devices[0].device_kind})" if t.topology else t.name
    lines = [f"target {where}, program {p.program}: {p.shape}",
             f"mesh {p.mesh}, rules {p.rules}",
             f"{'per chip':<44}{'GiB':>10}"]
    lines += [f"  {k:<42}{v / GIB:>10.3f}" for k, v in p.inputs.items()]
    lines += [f"  {k:<42}{v / GIB:>10.3f}" for k, v in p.memory.items()]
    lines.append(f"fits {p.hbm_gib:g} GiB: {'yes' if p.fits else 'no'}")
    if p.host_bytes:
        lines.append(f"  {'in host memory (offloaded, not HBM)':<42}{p.host_bytes / GIB:>10.3f}")
    if p.refused:
        lines.append(f"the TPU compiler refused the program ({p.refused}); the arguments are the inputs' bytes")
        return "\n".join(lines)
    lines.append("compiler figures per chip and execution (bounds from the compiled program, not measurements):")
    lines.append(f"  FLOPs, loop-corrected {p.flops / 1e12:,.3f} T (XLA's cost analysis, loop bodies once: "
                 f"{p.xla_flops / 1e12:,.3f} T)")
    ratio = p.flops / p.analytic_flops if p.analytic_flops else float("nan")
    lines.append(f"  analytic FLOPs {p.analytic_flops / 1e12:,.3f} T: compiled / analytic = {ratio:.3f}")
    lines.append(f"  HBM bytes, loop-corrected {p.bytes / 1e9:,.2f} G (XLA, loop bodies once: {p.xla_bytes / 1e9:,.2f} G)")
    if p.unknown_loops:
        lines.append(f"  loops of unknown trip count, counted once: {', '.join(p.unknown_loops)}")
    if t.chip is not None:
        c = t.chip
        bound = "compute" if p.flops / c.peak_flops >= p.bytes / c.hbm_bandwidth else "HBM"
        lines.append(f"  roofline: step time >= {p.bound_s * 1e3:,.1f} ms ({bound}-bound at {c.name}'s "
                     f"{c.peak_flops / 1e12:g} TFLOP/s bf16, {c.hbm_bandwidth / 1e9:g} GB/s HBM), "
                     f"so MFU <= {p.mfu:.3f} (model FLOPs {p.model_flops / 1e12:,.3f} T)")
    lines.append(f"compiled in {p.compile_s:.1f} s")
    return "\n".join(lines)
