"""Scan an image collection with SafeVLM's safety head alone (guard mode).

    python -m safevlm_jax.scan --checkpoint CKPT --images DIR_OR_GLOB_OR_TFDS --out OUT \
        [--batch_size 64] [--policy policy.json] [--no_blur] [--distributed]

`--images` is a folder (walked recursively), a glob (`**` allowed) or a dataset directory
built by `safevlm_jax.data.build` (every split; keys `split[index]`). Writes:

  OUT/verdicts.jsonl  one object per image: path, risk_level, risk_type, risk_type_name,
                      risk_level_probs, risk_type_probs, action (the risk policy's)
  OUT/skipped.jsonl   unreadable / corrupt / too-large images: path, reason, detail
  OUT/summary.md, OUT/histogram.png, OUT/contact_sheet.png   (`safevlm_jax.guard.report`)

Re-running skips every path already in verdicts.jsonl or skipped.jsonl. With `--distributed`
(`jax.distributed.initialize`), process p of n scores items p, p+n, ... of the sorted list
on its local devices, writing `OUT/parts/*-p-of-n.jsonl`; process 0 merges them into
verdicts.jsonl and skipped.jsonl and writes the report.
"""

from __future__ import annotations

import sys

from safevlm_jax.guard.collection import scan
from safevlm_jax.safety.policy import RiskPolicy, load_policy


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m safevlm_jax.scan", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (safety modules on)")
    p.add_argument("--images", required=True, help="folder, glob or TFDS dataset directory")
    p.add_argument("--out", required=True, help="output directory (re-use it to resume)")
    p.add_argument("--batch_size", type=int, default=64, help="images per step (all local devices)")
    p.add_argument("--policy", help="risk policy file (JSON/YAML; default: the paper's rules)")
    p.add_argument("--no_blur", action="store_true", help="do not blur the contact sheet thumbnails")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (multi-host; settings from the environment)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {args.batch_size}")
    try:
        policy = load_policy(args.policy) if args.policy else RiskPolicy()
        if args.distributed:
            import jax

            jax.distributed.initialize()
        counts = scan(args.checkpoint, args.images, args.out, batch_size=args.batch_size,
                      policy=policy, blur=not args.no_blur, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(" ".join(f"{k}={v}" for k, v in counts.items()) + f" out={args.out}")


if __name__ == "__main__":
    main()
