"""The README's plan table, from the TPU compiler on this host (compile-only TPU devices).

    nice python benchmarks/tpu_plan_table.py                       # every case, resumable
    python benchmarks/tpu_plan_table.py --only goals                # the issue's goals first
    python benchmarks/tpu_plan_table.py --print_only                # the table of what is done
    python benchmarks/tpu_plan_table.py --recount                   # after a change to plan/hlo_cost.py

Each case is `safevlm_jax.plan.make_plan` of a training config in a process of its own (a
7B train step takes 4-20 minutes to compile on 2 cores, several GiB of RAM), its figures
appended as one JSON line to `--results` and its compiled HLO kept under `--hlo_dir`
(`--recount` counts FLOPs and bytes again from it, compiling nothing); cases already there are
skipped, so an interrupted run resumes. Cases (`--only` picks groups):

  table    7B and 13B, stage 1 and stage 2, on v5e-8, v5p-64 and v6e-8, splash and the XLA
           reference, at each config's batch (2 per chip x accumulation 8, length 2048)
  goals    7B stage 2 on v5e-8: batch 8 x accumulation 2 (global 128) and batch 2 x 8 at length
           4096, splash and XLA; remat policies
  batch    the largest batch per chip (powers of 2, accumulation 1) that fits at length 2048
  length   the longest length (multiples of 1024) that fits at batch 1

Prints the table (per-chip GiB, fits, loop-corrected compiled TFLOP per chip against the
analytic count, the roofline bound on step time and the MFU it implies) and a last
`key=value` line. These are compiler figures: bounds, not measurements.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from absl import flags  # noqa: E402

from safevlm_jax import cli  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_string("results", "/tmp/tpu_plan_table.jsonl", "JSON lines of finished cases", flag_values=FLAGS)
flags.DEFINE_list("only", "goals,table,batch,length", "case groups to run", flag_values=FLAGS)
flags.DEFINE_string("memory_only", "", "results of earlier compiles whose memory figures still hold but whose "
                    "FLOP and byte counts are out of date (no HLO kept): the table shows their memory for cases "
                    "--results lacks", flag_values=FLAGS)
flags.DEFINE_bool("print_only", False, "print the table of the results file, compile nothing", flag_values=FLAGS)
flags.DEFINE_integer("timeout", 3600, "seconds one compile may take", flag_values=FLAGS)
flags.DEFINE_string("case", "", "internal: run this one case (JSON) and print its figures", flag_values=FLAGS)
flags.DEFINE_string("hlo_dir", "/tmp/tpu_plan_table_hlo", "each compiled case's HLO text, gzipped, for --recount",
                    flag_values=FLAGS)
flags.DEFINE_bool("recount", False, "recount the FLOPs, bytes and bounds of every case from its stored HLO "
                  "(after a change to safevlm_jax/plan/hlo_cost.py), compile nothing", flag_values=FLAGS)
flags.DEFINE_string("dump_dir", "", "write each case's compiled train step and buffer assignment under "
                    "DIR/<case number> (XLA_FLAGS --xla_dump_to)", flag_values=FLAGS)

TARGETS = ("v5e-8", "v5p-64", "v6e-8")
SEARCH_REMAT = "offload_layer_inputs"
GIB = 2**30


def case(model: str, stage: int, target: str, attention: str, batch: int = 2, accumulation: int = 8,
         length: int = 2048, remat: str = "full", group: str = "table") -> dict:
    return dict(model=model, stage=stage, target=target, attention=attention, batch=batch,
                accumulation=accumulation, length=length, remat=remat, group=group)


CASE_FIELDS = ("model", "stage", "target", "attention", "batch", "accumulation", "length", "remat")


def key(c: dict) -> str:
    """What identifies a case (a result carries its figures too)."""
    return json.dumps({k: c[k] for k in CASE_FIELDS})


def groups() -> dict[str, list[dict]]:
    goals = [case("7b", 2, "v5e-8", a, batch=8, accumulation=2, remat=r, group="goals")
             for r in ("full", "offload_layer_inputs") for a in ("splash", "xla")]
    goals += [case("7b", 2, "v5e-8", a, batch=2, accumulation=8, length=4096, group="goals") for a in ("splash", "xla")]
    goals += [case("7b", 2, "v5e-8", "splash", batch=8, accumulation=2, remat="dots_with_no_batch_dims_saveable",
                   group="goals")]
    table = [case(m, s, t, a) for m in ("7b", "13b") for s in (2, 1) for t in TARGETS for a in ("splash", "xla")]
    return {"goals": goals, "table": table}


def case_config(c: dict):
    from configs.train_common import train_config

    cfg = train_config(c["stage"], c["model"])
    cfg.batch_per_device, cfg.accumulation, cfg.data.max_length = c["batch"], c["accumulation"], c["length"]
    cfg.model.attention, cfg.model.remat_policy = c["attention"], c["remat"]
    return cfg


def run_case(c: dict) -> dict:
    """Compiles one case in this process; returns its figures."""
    from safevlm_jax import plan

    plan.use_cpu_platform()
    p = plan.make_plan(case_config(c), plan.get_target(c["target"]), "train")
    if p.hlo and FLAGS.hlo_dir:
        os.makedirs(FLAGS.hlo_dir, exist_ok=True)
        with gzip.open(hlo_path(c), "wt") as f:
            f.write(p.hlo)
    return dict(c, gib=p.memory["total"] / GIB, temp_gib=p.memory["temporaries"] / GIB,
                args_gib=p.memory["arguments"] / GIB, host_gib=p.host_bytes / GIB, hbm_gib=p.hbm_gib, fits=p.fits,
                refused=p.refused, analytic_tflops=p.analytic_flops / 1e12, model_tflops=p.model_flops / 1e12,
                xla_tflops=None if p.xla_flops is None else p.xla_flops / 1e12, compile_s=p.compile_s,
                **cost_fields(p))


def cost_fields(p) -> dict:
    """The figures that come from counting the compiled HLO (None for a refused program)."""
    scaled = lambda x, unit: None if x is None else x / unit  # noqa: E731
    return dict(tflops=scaled(p.flops, 1e12), gbytes=scaled(p.bytes, 1e9), bound_s=p.bound_s, mfu=p.mfu,
                unknown_loops=p.unknown_loops)


def hlo_path(c: dict) -> str:
    return os.path.join(FLAGS.hlo_dir, hashlib.sha1(key(c).encode()).hexdigest()[:16] + ".hlo.gz")


def recount(r: dict) -> dict:
    """Case result `r` with its analytic FLOPs computed again, and its HLO figures counted
    again from its stored HLO (kept when there is none: a refused program, or a case compiled
    without --hlo_dir). The table's stage 2 trains the LLM's LoRA factors, stage 1 none of its
    weights."""
    from safevlm_jax import plan
    from safevlm_jax.config import ModelConfig
    from safevlm_jax.plan import analytic, hlo_cost, targets

    mcfg = ModelConfig.from_dict(case_config(r).model)
    chips = math.prod(int(n) for n in targets.topology_name(r["target"]).split(":")[1].split("x"))
    trained = analytic.lora_weights(mcfg) if r["stage"] == 2 else 0
    rows = r["batch"] * chips * r["accumulation"]
    r = dict(r, analytic_tflops=analytic.train_step(mcfg, rows, r["length"], trained) / chips / 1e12)
    if r.get("refused") or "error" in r or not os.path.exists(hlo_path(r)):
        return r
    with gzip.open(hlo_path(r), "rt") as f:
        cost = hlo_cost.cost(f.read())
    chip = next(c for c in targets.CHIPS.values() if c.name == r["target"].split("-")[0])
    target = targets.Target(r["target"], targets.topology_name(r["target"]), [None], chip)
    p = plan.Plan(target, "train", "", {}, "", {}, {}, r["hbm_gib"], cost.flops, cost.bytes, None, None,
                  r["analytic_tflops"] * 1e12, r["model_tflops"] * 1e12, r["compile_s"], cost.unknown_loops)
    return dict(r, **cost_fields(p))


def load(path: str) -> dict[str, dict]:
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return {key(r): r for r in map(json.loads, f) if r}


def compile_case(c: dict, done: dict[str, dict]) -> dict:
    """The figures of case `c`: from the results file, else compiled in a subprocess."""
    if key(c) in done:
        return done[key(c)]
    start = time.time()
    env = dict(os.environ)
    if FLAGS.dump_dir:
        where = os.path.join(FLAGS.dump_dir, str(len(done)))
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={where} --xla_dump_hlo_module_re=step_under_rules"
    try:
        out = subprocess.run([sys.executable, __file__, f"--case={json.dumps(c)}", f"--hlo_dir={FLAGS.hlo_dir}"], cwd=ROOT, capture_output=True,
                             text=True, timeout=FLAGS.timeout, env=env)
        lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
        result = json.loads(lines[-1]) if out.returncode == 0 and lines else dict(
            c, error=(out.stderr.strip().splitlines() or ["no output"])[-1][:300])
    except subprocess.TimeoutExpired:
        result = dict(c, error=f"compile took over {FLAGS.timeout} s")
    result["wall_s"] = time.time() - start
    with open(FLAGS.results, "a") as f:
        f.write(json.dumps(result) + "\n")
    done[key(result)] = result
    state = f"error {result['error']}" if "error" in result else f"{result['gib']:.2f} GiB"
    print(f"{key(c)}: {state} ({result['wall_s']:.0f} s)", flush=True)
    return result


def largest(make, values, done) -> int | None:
    """The largest of `values` whose case `make(v)` fits, trying the largest first: a program
    that does not fit is refused by the compiler in seconds, one that fits takes minutes."""
    for v in sorted(values, reverse=True):
        if compile_case(make(v), done).get("fits"):
            return v
    return None


def memory_cell(r: dict) -> str:
    """GiB/chip (temporaries[, host-offloaded]) and whether it fits; a refused program's
    figures are what the compiler asked for before it stopped (a lower bound)."""
    if r.get("refused"):
        return f"> {r['gib']:.2f} ({r['temp_gib']:.2f}): refused by the compiler"
    host = f", {r['host_gib']:.1f} on host" if r.get("host_gib") else ""
    return f"{r['gib']:.2f} ({r['temp_gib']:.2f}{host}), {'fits' if r['fits'] else '**does not fit**'}"


def cells(r: dict | None) -> str:
    """One attention's three cells of a table row: memory (`memory_cell`); compiled / analytic
    TFLOP per chip; the roofline bound on step time and MFU."""
    if r is None:
        return "not compiled | | "
    if "error" in r:
        return f"error: {r['error']} | | "
    if r.get("memory_only"):
        return f"{memory_cell(r)} (earlier compile) | not recounted | not recounted "
    if r.get("refused"):
        return f"{memory_cell(r)} | - | - "
    return (f"{memory_cell(r)} | "
            f"{r['tflops']:,.0f} / {r['analytic_tflops']:,.0f} = {r['tflops'] / r['analytic_tflops']:.2f} | "
            f"{r['bound_s']:.2f} s, {r['mfu']:.2f} ")


def row(done: dict[str, dict], c: dict, what: str) -> str:
    """A table row of case `c` (its attention field ignored): splash, then XLA."""
    pair = [done.get(key(dict(c, attention=a))) for a in ("splash", "xla")]
    return f"| {what} | {cells(pair[0])}| {cells(pair[1])}|"


_COLUMNS = "GiB/chip (temporaries), fits | TFLOP/chip compiled / analytic | step time >=, MFU <="
HEADER = f"splash: {_COLUMNS} | XLA: {_COLUMNS} |"


def largest_fitting(done: dict[str, dict], group: str, model: str, target: str, field: str) -> str:
    """The values of `field` compiled in `group`'s search: which fit, which did not (the search
    tries the largest first; values it did not reach are not listed)."""
    rows = [r for r in done.values() if r["group"] == group and r["model"] == model and r["target"] == target
            and "error" not in r]
    if not rows:
        return "not compiled"
    fit = sorted(r[field] for r in rows if r.get("fits"))
    miss = sorted(r[field] for r in rows if not r.get("fits"))
    return "; ".join(part for part in (f"fits: {', '.join(map(str, fit))}" if fit else "",
                                       f"does not fit: {', '.join(map(str, miss))}" if miss else "") if part)


def print_pairs(done: dict[str, dict], cases: list[dict], title: str, what) -> None:
    """A table of `cases`, one row per case with splash and XLA side by side; `what(c)` names it."""
    print(f"| {title} | {HEADER}")
    print("|---|" + "---:|" * 6)
    for c in cases:
        if c["attention"] == "splash":
            print(row(done, c, what(c)))
    print()


def print_table(done: dict[str, dict]) -> None:
    cases = groups()
    print_pairs(done, cases["table"], "model, stage, target (batch 2/chip x accumulation 8, length 2048, full remat)",
                lambda c: f"{c['model'].upper()} stage {c['stage']}, {c['target']}")
    print_pairs(done, cases["goals"], "7B stage 2, v5e-8: batch/chip x accumulation, length, remat",
                lambda c: f"{c['batch']} x {c['accumulation']}, {c['length']}, {c['remat']}")
    print("| model | target | batch/chip at length 2048 (splash, offload_layer_inputs) | length at batch 1 |")
    print("|---|---|---|---|")
    for m in ("7b", "13b"):
        for t in TARGETS:
            print(f"| {m.upper()} | {t} | {largest_fitting(done, 'batch', m, t, 'batch')} | "
                  f"{largest_fitting(done, 'length', m, t, 'length')} |")
    goal = {(r["attention"], r["remat"]): r for r in done.values() if r["group"] == "goals" and r["batch"] == 8
            and "error" not in r}
    ratios = {}
    if ("splash", "full") in goal and ("xla", "full") in goal:
        ratios["temp_splash_over_xla_b8"] = goal["splash", "full"]["temp_gib"] / goal["xla", "full"]["temp_gib"]
    best = min((r for r in goal.values() if r["attention"] == "splash"), key=lambda r: r["gib"], default=None)
    if best is not None:
        ratios["b8x2_best_gib"] = best["gib"]
        if best.get("tflops") and not best.get("memory_only"):
            ratios["flops_over_analytic_b8"] = best["tflops"] / best["analytic_tflops"]
    print(" ".join(f"{k}={v:.3f}" for k, v in ratios.items()) or "no_goal_cases=1")


def _main(argv) -> None:
    del argv
    if FLAGS.case:
        print(json.dumps(run_case(json.loads(FLAGS.case))))
        return
    done = load(FLAGS.results)
    if FLAGS.recount:
        done = {k: recount(r) for k, r in done.items()}
        with open(FLAGS.results, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in done.values())
    elif not FLAGS.print_only:
        cases = groups()
        for g in ("goals", "table"):
            if g in FLAGS.only:
                for c in cases[g]:
                    compile_case(c, done)
        for m in ("7b", "13b"):
            for t in TARGETS:  # stage 2 (the larger optimizer state), splash, layer inputs offloaded
                if "batch" in FLAGS.only:
                    largest(lambda b: case(m, 2, t, "splash", batch=b, accumulation=1, remat=SEARCH_REMAT,
                                           group="batch"), (1, 2, 4, 8, 16, 32), done)
                if "length" in FLAGS.only:
                    largest(lambda n: case(m, 2, t, "splash", batch=1, accumulation=1, length=n, remat=SEARCH_REMAT,
                                           group="length"), (2048, 4096, 8192, 16384, 32768), done)
    earlier = {k: dict(r, memory_only=True) for k, r in load(FLAGS.memory_only).items()
               if k not in done and "error" not in r}
    print_table({**earlier, **done})


if __name__ == "__main__":
    cli.run(_main, FLAGS)
