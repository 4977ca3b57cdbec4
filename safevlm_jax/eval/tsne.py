"""t-SNE of pooled CLIP features vs safety-projector features (the paper's Fig. 4).

    python -m safevlm_jax.eval.tsne --checkpoint CKPT --data DIR_OR_JSON --out DIR

For each labelled image: the CLIP features the projectors read ([N, C], mean over patches ->
[C]) and the safety projector's output ([Q, d], mean over queries -> [d]). Each set is
embedded in 2-D with scikit-learn's t-SNE and drawn coloured by risk level and by risk type.
The separation is also a number: the silhouette score of each labelling, on the features
themselves and on their 2-D embedding. Writes to DIR:

  tsne.png          2 x 2 grid: rows level / type, columns CLIP / safety projector
  tsne.json         n, perplexity, silhouette {feature set: {labelling: {features, tsne}}}, skipped
  tsne_points.npz   ids, levels, types and the 2-D points of each feature set
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Sequence

import jax
import numpy as np
from absl import flags
from flax import nnx
from tqdm import tqdm

from safevlm_jax import cli
from safevlm_jax.eval import plots
from safevlm_jax.eval.dataset import (Example, batches, define_labelled_data_flags, load_labelled,
                                      load_pixels, resolve_checkpoint, warn_skipped)
from safevlm_jax.safety.taxonomy import RISK_LEVELS, RISK_TYPES

FEATURE_SETS = ("CLIP", "safety projector")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def pooled_features(graphdef, state, pixel_values):
    """(graphdef, state) of a `guard.VerdictModel`, pixel_values [B, H, W, 3] ->
    (CLIP features [B, C], safety projector output [B, d]), each averaged over positions."""
    model = nnx.merge(graphdef, state)
    features = model.image_features(pixel_values)  # [B, N(+1), C]
    if model.config.vision_feature_select_strategy == "full":
        features = features[:, 1:]  # as SafeVLM.safety_logits: the C-Abstractor takes the patch grid
    return features.mean(axis=1), model.safety_projector(features).mean(axis=1)


def extract(model, examples: Sequence[Example], images, batch_size: int = 32,
            progress: bool = True) -> dict[str, np.ndarray]:
    """{feature set: [n, dim] float32} for a `VerdictModel`; batches padded to one shape."""
    graphdef, state = nnx.split(model)
    clip, safety = [], []
    for batch in tqdm(list(batches(examples, batch_size)), desc="features", unit="batch",
                      disable=not progress, file=sys.stderr):
        pixels = load_pixels([e.path for e in batch], images)
        pad = np.repeat(pixels[:1], batch_size - len(batch), axis=0)
        c, s = pooled_features(graphdef, state, np.concatenate([pixels, pad]))
        clip.append(np.asarray(c, np.float32)[:len(batch)])
        safety.append(np.asarray(s, np.float32)[:len(batch)])
    return dict(zip(FEATURE_SETS, (np.concatenate(clip), np.concatenate(safety))))


def silhouette(x: np.ndarray, labels: np.ndarray) -> float | None:
    """scikit-learn's silhouette score; None when it is undefined (fewer than 2 classes
    present, or as many classes as points)."""
    from sklearn.metrics import silhouette_score

    k = len(np.unique(labels))
    return float(silhouette_score(x, labels)) if 2 <= k <= len(labels) - 1 else None


def embed(x: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """[n, dim] -> [n, 2] t-SNE (PCA init); perplexity capped below n as scikit-learn requires."""
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        x.astype(np.float64)).astype(np.float32)


def run(checkpoint: str, data: str, out: str, *, image_root: str | None = None, batch_size: int = 32,
        perplexity: float = 30.0, seed: int = 0, limit: int | None = None, strict: bool = False,
        progress: bool = True) -> dict:
    """Writes the files above to `out`; returns the content of tsne.json."""
    from safevlm_jax.checkpoint.assets import image_config
    from safevlm_jax.guard.model import load_verdict_model

    model = load_verdict_model(checkpoint)
    images = image_config(checkpoint, model.config)
    examples, skipped = load_labelled(data, image_root, num_levels=model.config.safety.num_levels,
                                      num_types=model.config.safety.num_types, max_pixels=images.max_pixels,
                                      strict=strict)
    warn_skipped(skipped, "records")
    examples = examples[:limit] if limit else examples
    if len(examples) < 4:
        raise ValueError(f"{data}: t-SNE needs at least 4 usable images, got {len(examples)}")
    features = extract(model, examples, images, batch_size, progress)
    perplexity = min(perplexity, (len(examples) - 1) / 3)
    labels = {"level": (np.array([e.level for e in examples]), RISK_LEVELS),
              "type": (np.array([e.type for e in examples]), RISK_TYPES)}
    points = {name: embed(x, perplexity, seed) for name, x in features.items()}
    scores = {name: {kind: {"features": silhouette(features[name], y), "tsne": silhouette(points[name], y)}
                     for kind, (y, _) in labels.items()} for name in features}
    result = {"checkpoint": os.path.abspath(checkpoint), "data": os.path.abspath(data), "n": len(examples),
              "perplexity": perplexity, "seed": seed,
              "dims": {name: int(x.shape[1]) for name, x in features.items()},
              "silhouette": scores, "skipped": [s.to_json() for s in skipped]}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tsne.json"), "w") as f:
        json.dump(result, f, indent=1)
    np.savez(os.path.join(out, "tsne_points.npz"), ids=np.array([e.id for e in examples]),
             level=labels["level"][0], type=labels["type"][0],
             **{name.replace(" ", "_"): p for name, p in points.items()})
    plots.scatter_grid(points, labels, os.path.join(out, "tsne.png"),
                       f"t-SNE of pooled features (n={len(examples)}, perplexity {perplexity:.1f})")
    return result


FLAGS = flags.FlagValues()
define_labelled_data_flags(FLAGS)
flags.DEFINE_float("perplexity", 30.0, "t-SNE perplexity (capped below n / 3)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "t-SNE seed", flag_values=FLAGS)
flags.DEFINE_integer("limit", None, "use only the first LIMIT usable images", flag_values=FLAGS)


def _main(argv) -> None:
    del argv
    r = run(resolve_checkpoint(FLAGS.checkpoint), FLAGS.data, FLAGS.out, image_root=FLAGS.image_root,
            batch_size=FLAGS.batch_size, perplexity=FLAGS.perplexity, seed=FLAGS.seed, limit=FLAGS.limit,
            strict=FLAGS.strict, progress=not FLAGS.no_progress)
    for name, by in r["silhouette"].items():
        print(f"{name}: silhouette by level {by['level']['features']}, by type {by['type']['features']}")
    print(f"wrote {FLAGS.out}")


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    main()
