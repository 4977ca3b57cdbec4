"""Command line: build the SafeVLM TFDS dataset.

  python -m safevlm_jax.data.build --json F --image_root D --out DIR [--strict]

Prints the dataset directory and the skip counts; the full report is in its `report.json`.
"""

from __future__ import annotations

import argparse
import json

import tensorflow_datasets as tfds

from safevlm_jax.data import images
from safevlm_jax.data.errors import BadRecord
from safevlm_jax.data.tfds_builder import build_dataset


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="SafeVLM JSON file (a list of records)")
    p.add_argument("--image_root", required=True, help="directory the records' image paths are relative to")
    p.add_argument("--out", required=True, help="TFDS data_dir to write into")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument("--max_pixels", type=int, default=images.DEFAULT_MAX_PIXELS)
    p.add_argument("--validation_fraction", type=float, default=0.05)
    p.add_argument("--overwrite", action="store_true", help="rebuild if the dataset already exists")
    args = p.parse_args(argv)
    tfds.disable_progress_bar()  # ours (tqdm) count records and images instead
    try:
        path, report = build_dataset(args.json, args.image_root, args.out, strict=args.strict,
                                     max_pixels=args.max_pixels, validation_fraction=args.validation_fraction,
                                     overwrite=args.overwrite, progress=True)
    except BadRecord as e:
        raise SystemExit(f"error: {args.json}: {e}") from e
    print(path)
    print(json.dumps({"total": report.total, "kept": report.kept, "skipped": report.skipped}, indent=2))


if __name__ == "__main__":
    main()
