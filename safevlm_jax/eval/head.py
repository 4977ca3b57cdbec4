"""Safety-head accuracy on labelled images (the paper's Fig. 5).

    python -m safevlm_jax.eval.head --checkpoint CKPT --data DIR_OR_JSON --out DIR

Runs the guard's jitted verdict program (`safevlm_jax.guard.model`, the same verdict the sampler
acts on, data-parallel over the local devices) over batches of images and writes to DIR:

  head_metrics.json    level and type: accuracy, macro/weighted P/R/F1, per-class rows,
                       confusion matrices; the skipped records and their reasons
  predictions.jsonl    per image: labels, predictions, probabilities
  confusion_level.png, confusion_type.png
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import numpy as np
from absl import flags
from tqdm import tqdm

from safevlm_jax import cli
from safevlm_jax.data.images import ImageConfig
from safevlm_jax.eval import plots
from safevlm_jax.eval.dataset import (Example, batches, define_labelled_data_flags, load_labelled,
                                      load_pixels, resolve_checkpoint, warn_skipped)
from safevlm_jax.eval.metrics import classification_report
from safevlm_jax.safety.taxonomy import RISK_LEVELS, RISK_TYPES

METRICS, PREDICTIONS = "head_metrics.json", "predictions.jsonl"


def predict(guard, examples: Sequence[Example], images: ImageConfig, batch_size: int = 32,
            progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Level probabilities [n, 4] and type probabilities [n, 7] float32, one guard call per
    batch, every batch padded to `batch_size` rows (one compiled shape)."""
    level, kind = [], []
    with tqdm(total=len(examples), unit="img", desc="safety head", disable=not progress, file=sys.stderr) as bar:
        for batch in batches(examples, batch_size):
            lp, tp = guard(load_pixels([e.path for e in batch], images), pad_to=batch_size)
            level.append(lp)
            kind.append(tp)
            bar.update(len(batch))
    return np.concatenate(level), np.concatenate(kind)


def _argmax(probs: np.ndarray) -> np.ndarray:
    return np.argmax(np.nan_to_num(probs, nan=-1.0), axis=-1)


def head_metrics(examples: Sequence[Example], level_probs: np.ndarray, type_probs: np.ndarray) -> dict:
    """{"n", "non_finite_rows", "level": report, "type": report} (`metrics.classification_report`).
    Rows whose probabilities are not finite are counted and scored by the finite entries."""
    finite = np.isfinite(level_probs).all(-1) & np.isfinite(type_probs).all(-1)
    return {"n": len(examples), "non_finite_rows": int((~finite).sum()),
            "level": classification_report([e.level for e in examples], _argmax(level_probs), RISK_LEVELS),
            "type": classification_report([e.type for e in examples], _argmax(type_probs), RISK_TYPES)}


def run(checkpoint: str, data: str, out: str, *, image_root: str | None = None, batch_size: int = 32,
             strict: bool = False, progress: bool = True) -> dict:
    """Scores the checkpoint's safety head on `data` and writes the files above to `out`.
    Returns the content of head_metrics.json."""
    from safevlm_jax.checkpoint.assets import image_config
    from safevlm_jax.guard.model import Guard

    guard = Guard.from_checkpoint(checkpoint)
    images = image_config(checkpoint, guard.config)
    safety = guard.config.safety
    examples, skipped = load_labelled(data, image_root, num_levels=safety.num_levels,
                                      num_types=safety.num_types, max_pixels=images.max_pixels, strict=strict)
    warn_skipped(skipped, "records")
    level_probs, type_probs = predict(guard, examples, images, batch_size, progress)
    result = {"checkpoint": os.path.abspath(checkpoint), "data": os.path.abspath(data),
              **head_metrics(examples, level_probs, type_probs),
              "skipped": [s.to_json() for s in skipped]}
    if result["non_finite_rows"]:
        print(f"warning: {result['non_finite_rows']} images got non-finite head output", file=sys.stderr)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, METRICS), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, PREDICTIONS), "w") as f:
        for e, lp, tp in zip(examples, level_probs.tolist(), type_probs.tolist()):
            f.write(json.dumps({"id": e.id, "safe_level": e.level, "safe_type": e.type,
                                "pred_level": int(_argmax(np.asarray(lp))), "pred_type": int(_argmax(np.asarray(tp))),
                                "level_probs": lp, "type_probs": tp}) + "\n")
    for key, names in (("level", RISK_LEVELS), ("type", RISK_TYPES)):
        r = result[key]
        plots.confusion_png(np.asarray(r["confusion"]), names,
                            f"risk {key}: accuracy {r['accuracy']:.3f} (n={r['n']})",
                            os.path.join(out, f"confusion_{key}.png"))
    return result


FLAGS = flags.FlagValues()
define_labelled_data_flags(FLAGS)


def _main(argv) -> None:
    del argv
    r = run(resolve_checkpoint(FLAGS.checkpoint), FLAGS.data, FLAGS.out, image_root=FLAGS.image_root,
            batch_size=FLAGS.batch_size, strict=FLAGS.strict, progress=not FLAGS.no_progress)
    print(f"level accuracy {r['level']['accuracy']:.4f}, type accuracy {r['type']['accuracy']:.4f} "
          f"on {r['n']} images ({len(r['skipped'])} skipped); wrote {FLAGS.out}")


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    main()
