"""The two ends of `benchmarks/device_check.sh`.

    python benchmarks/device_report.py env              # versions, devices, imports; key=value last
    python benchmarks/device_report.py summary WORK     # WORK: stages.tsv + <stage>.out files

`env` prints what the run is measured on and imports every module the stages use, so a missing
package shows before any stage spends time (exit 1 if one fails). `summary` prints each stage's
own table (the last line of pytest for the tests), a table of the stages, the goals of issue 19
against what was measured, and, last, one `key=value` line: `<stage>.<key>` for every figure a
stage printed, `<stage>.status` and `<stage>.s`, `mode`, `total.s`, and `goal.<name>=met|missed|unmeasured`.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import sys

MODULES = ("configs.model", "configs.stage2", "checkpoints_tools.keymap", "safevlm_jax.inference.programs",
           "safevlm_jax.train.step", "safevlm_jax.train.optimizer", "safevlm_jax.data.pipeline", "grain",
           "tensorflow_datasets", "tensorboardX", "peft")
VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "torch", "transformers", "peft")

# (name, stage, what, threshold, value from that stage's figures); `case` is the stage's one case
GOALS = (
    ("decode_floor", "decode_7b", "7B bf16 decode, batch 1, of the copy-bandwidth floor", 0.70,
     lambda f, case, top: f.get(f"floor_{case}_b1")),
    ("decode_vs_hf", "decode_7b", "7B bf16 decode, batch 1, x HF generate", 2.0,
     lambda f, case, top: f.get(f"ratio_{case}_b1")),
    ("decode_batch", "decode_7b", "7B bf16 decode, largest batch / batch 1 in tokens/s", 5.0,
     lambda f, case, top: f.get(f"tps_{case}_b{top}", 0) / f[f"tps_{case}_b1"] if f.get(f"tps_{case}_b1") else None),
    ("train_mfu", "train_7b", "7B LoRA step MFU (bf16 matmul peak of the run)", 0.40,
     lambda f, case, top: f.get("mfu_bf16")),
    ("train_vs_torch", "train_7b", "7B LoRA step x torch + peft", 1.0,
     lambda f, case, top: f.get("ratio_bf16")),
)


def env() -> int:
    import devices  # noqa: F401  (the repo root on sys.path, JAX's allocator as the stages have it)
    import jax
    import torch

    for name in VERSIONS:
        mod = importlib.import_module(name)
        print(f"{name:<18} {getattr(mod, '__version__', '?')}")
    print(f"{'python':<18} {sys.version.split()[0]}")
    print(f"jax devices        {jax.devices()} (default backend {jax.default_backend()})")
    print(f"torch cuda         {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    failed = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure is the finding
            failed.append(name)
            print(f"import {name}: FAILED {type(e).__name__}: {e}")
    from safevlm_jax.kernels import matvec

    print(f"CPU decode kernel built: {matvec.library_path() is not None} (used on CPU only)")
    kind = re.sub(r"\W+", "_", jax.devices()[0].device_kind)
    print(f"platform={jax.default_backend()} devices={jax.device_count()} device_kind={kind} "
          f"jax={jax.__version__} torch={torch.__version__} import_failures={len(failed)}")
    return 1 if failed else 0


def figures(text: str) -> dict[str, str]:
    """The last line made only of key=value pairs."""
    for line in reversed(text.strip().splitlines()):
        pairs = line.split()
        if pairs and all(re.fullmatch(r"[\w.]+=\S+", p) for p in pairs):
            return dict(p.split("=", 1) for p in pairs)
    return {}


def pytest_counts(text: str) -> dict[str, str]:
    """{'passed': '37', 'failed': '1', ...} from pytest's last summary line."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return {k: n for n, k in re.findall(r"(\d+) (passed|failed|errors?|deselected|skipped)", lines[-1])} if lines else {}


def number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def summary(work: pathlib.Path) -> None:
    stages = [line.split("\t") for line in (work / "stages.tsv").read_text().splitlines() if line]
    mode = (work / "mode").read_text().strip()
    found, keys = {}, {"mode": mode, "total.s": sum(int(s) for _, _, s, *_ in stages)}
    for name, status, seconds, *_ in stages:
        path = work / f"{name}.out"
        text = path.read_text(errors="replace") if path.exists() else ""
        f = pytest_counts(text) if name == "tests" else figures(text)
        found[name] = f
        keys.update({f"{name}.status": status, f"{name}.s": seconds})
        keys.update({f"{name}.{k}": v for k, v in f.items()})
        print(f"--- {name}: {status}, {seconds} s")
        body = [ln for ln in text.strip().splitlines() if figures(ln) == {}]
        if name == "tests":  # the failures (-rfE) and pytest's last line
            body = [ln for ln in body if ln.startswith(("FAILED", "ERROR"))] + body[-1:]
        print("\n".join(body) or "(no output)")
    print(f"\n{'stage':<12} {'status':<14} {'s':>5}  figures")
    for name, status, seconds, *_ in stages:
        shown = " ".join(f"{k}={v}" for k, v in list(found[name].items())[:6])
        print(f"{name:<12} {status:<14} {seconds:>5}  {shown}")
    note = "  (dry run: tiny sizes, the goals do not apply)" if mode == "tiny" else ""
    print(f"\n{'goal (issue 19)':<58} {'goal':>6} {'measured':>9}  verdict{note}")
    for name, stage, what, threshold, get in GOALS:
        f = {k: number(v) for k, v in found.get(stage, {}).items()}
        cases = sorted({m.group(1) for k in f for m in [re.fullmatch(r"tps_(.+)_b1", k)] if m})
        batches = [int(m.group(1)) for k in f for m in [re.fullmatch(r"tps_.+_b(\d+)", k)] if m]
        try:
            value = get(f, cases[0] if cases else "", max(batches, default=1))
        except (KeyError, TypeError, ZeroDivisionError):
            value = None
        verdict = "unmeasured" if value is None else ("met" if value >= threshold else "missed")
        keys[f"goal.{name}"] = verdict
        shown = "-" if value is None else f"{value:.2f}"
        print(f"{what:<58} {threshold:>6.2f} {shown:>9}  {verdict}")
    print(" ".join(f"{k}={v}" for k, v in keys.items()))


def main(argv: list[str]) -> int:
    if argv[1:2] == ["env"]:
        return env()
    if argv[1:2] == ["summary"] and len(argv) == 3:
        summary(pathlib.Path(argv[2]))
        return 0
    print("error: usage: device_report.py env | summary WORK_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
