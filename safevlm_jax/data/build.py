"""Command line: build the SafeVLM TFDS dataset.

  python -m safevlm_jax.data.build --json F --image_root D --out DIR [--strict]

Prints the dataset directory and the skip counts; the full report is in its `report.json`.
"""

from __future__ import annotations

import json

import tensorflow_datasets as tfds
from absl import flags

from safevlm_jax import cli
from safevlm_jax.data import images
from safevlm_jax.data.errors import BadRecord
from safevlm_jax.data.tfds_builder import build_dataset

FLAGS = flags.FlagValues()
flags.DEFINE_string("json", None, "SafeVLM JSON file (a list of records)", required=True, flag_values=FLAGS)
flags.DEFINE_string("image_root", None, "directory the records' image paths are relative to", required=True,
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "TFDS data_dir to write into", required=True, flag_values=FLAGS)
flags.DEFINE_bool("strict", False, "stop at the first bad record instead of skipping it", flag_values=FLAGS)
flags.DEFINE_integer("max_pixels", images.DEFAULT_MAX_PIXELS, "images with more pixels are refused (image_too_large)", flag_values=FLAGS)
flags.DEFINE_float("validation_fraction", 0.05, "share of records in the validation split", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "rebuild if the dataset already exists", flag_values=FLAGS)


def _main(argv) -> None:
    del argv
    tfds.disable_progress_bar()  # ours (tqdm) count records and images instead
    try:
        path, report = build_dataset(FLAGS.json, FLAGS.image_root, FLAGS.out, strict=FLAGS.strict,
                                     max_pixels=FLAGS.max_pixels, validation_fraction=FLAGS.validation_fraction,
                                     overwrite=FLAGS.overwrite, progress=True)
    except BadRecord as e:  # --strict: the record's own message lacks the file
        raise ValueError(f"{FLAGS.json}: {e}") from e
    print(path)
    print(json.dumps({"total": report.total, "kept": report.kept, "skipped": report.skipped}, indent=2))


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    main()
