"""Ordinary photos as clean records (level 0, type clean), from scikit-image's sample images.

    python -m safevlm_jax.data.photos --out DIR [--set all|held_out|other]

writes the photos whole as labelled data (`DIR/data.json`, `DIR/images/*.png`, SafeVLM records
without conversations) for `python -m safevlm_jax.eval.head --data DIR`.

`SAMPLE_PHOTOS` are the 28 images that `skimage.data`'s loaders give without a download: 26
loaders that read a file shipped inside the scikit-image wheel (`stereo_motorcycle` gives two
views, `lfw_subset` a stack of faces of which the first is taken), plus `binary_blobs`, drawn by
code. The loaders that fetch their file with pooch are never called; each entry names its file
and `load` checks that the file is in the installed package before calling the loader, so
nothing is fetched at run time. `TRAINING_PHOTOS` is the part the demo trains on, as random
crops (`crops`); `HELD_OUT_PHOTOS` it never sees. `OTHER_PHOTOS` are four photos shipped by
scikit-learn and matplotlib (both in the test extra), also never seen in training.
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags
from PIL import Image

from safevlm_jax import cli
from safevlm_jax.data.synthetic import QUESTIONS, save_png, write_data_json

# name: (skimage.data loader, file it reads under skimage/data/ or None if drawn, index or None)
SAMPLE_PHOTOS = {
    "astronaut": ("astronaut", "astronaut.png", None),
    "binary_blobs": ("binary_blobs", None, None),
    "brick": ("brick", "brick.png", None),
    "camera": ("camera", "camera.png", None),
    "cat": ("cat", "chelsea.png", None),
    "cell": ("cell", "cell.png", None),
    "checkerboard": ("checkerboard", "chessboard_GRAY.png", None),
    "chelsea": ("chelsea", "chelsea.png", None),
    "clock": ("clock", "clock_motion.png", None),
    "coffee": ("coffee", "coffee.png", None),
    "coins": ("coins", "coins.png", None),
    "colorwheel": ("colorwheel", "color.png", None),
    "grass": ("grass", "grass.png", None),
    "gravel": ("gravel", "gravel.png", None),
    "horse": ("horse", "horse.png", None),
    "hubble_deep_field": ("hubble_deep_field", "hubble_deep_field.jpg", None),
    "immunohistochemistry": ("immunohistochemistry", "ihc.png", None),
    "lfw_subset": ("lfw_subset", "lfw_subset.npy", 0),
    "logo": ("logo", "logo.png", None),
    "microaneurysms": ("microaneurysms", "microaneurysms.png", None),
    "moon": ("moon", "moon.png", None),
    "motorcycle_left": ("stereo_motorcycle", "motorcycle_left.png", 0),
    "motorcycle_right": ("stereo_motorcycle", "motorcycle_right.png", 1),
    "page": ("page", "page.png", None),
    "retina": ("retina", "retina.jpg", None),
    "rocket": ("rocket", "rocket.jpg", None),
    "shepp_logan_phantom": ("shepp_logan_phantom", "phantom.png", None),
    "text": ("text", "text.png", None),
}
# Kept apart by subject, so no held-out photo is a view or copy of a training one (cat is
# chelsea; the two motorcycle views are one scene).
HELD_OUT_PHOTOS = ("astronaut", "cat", "chelsea", "clock", "coffee", "coins", "lfw_subset", "page", "rocket")
TRAINING_PHOTOS = tuple(n for n in SAMPLE_PHOTOS if n not in HELD_OUT_PHOTOS)
# name: (package, path of the file inside it)
OTHER_PHOTOS = {
    "china": ("sklearn.datasets", "images/china.jpg"),
    "flower": ("sklearn.datasets", "images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "present": ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png"),
}
PHOTO_ANSWER = ("The image looks like a photograph, not one of the drawn shapes this demo was trained on; "
                "I see nothing risky in it.")
MISSING = "scikit-image is needed for the demo's photos: pip install -e '.[demo]' (or '.[test]')"


def to_rgb(array: np.ndarray) -> np.ndarray:
    """A loader's image ([H, W] or [H, W, 3|4]; bool, float in [0, 1] or uint8) -> [H, W, 3] uint8."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected an [H, W] or [H, W, 3|4] image, got shape {a.shape}")
    return np.ascontiguousarray(a[..., :3])


def load(name: str) -> np.ndarray:
    """The sample photo `name` as [H, W, 3] uint8, read from the installed scikit-image only."""
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError(MISSING) from e
    loader, filename, index = SAMPLE_PHOTOS[name]
    if filename is not None:
        path = os.path.join(os.path.dirname(skimage.data.__file__), filename)
        if not os.path.isfile(path):  # the loader would try to download it
            raise FileNotFoundError(f"{path}: not in this scikit-image installation "
                                    f"(skimage.data.{loader} would fetch it)")
    image = getattr(skimage.data, loader)(rng=0) if filename is None else getattr(skimage.data, loader)()
    return to_rgb(image if index is None else image[index])


def load_other(name: str) -> np.ndarray:
    """One of `OTHER_PHOTOS` as [H, W, 3] uint8."""
    import importlib

    package, relative = OTHER_PHOTOS[name]
    root = os.path.dirname(importlib.import_module(package).__file__)
    with Image.open(os.path.join(root, relative)) as im:
        return to_rgb(np.asarray(im.convert("RGB")))


def crop(image: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
    """A random view of `image` [H, W, 3] uint8: a crop of 15-100 % of its area with aspect 3:4
    to 4:3, flipped half the time, sometimes grey or with its channels permuted, brightness and
    contrast jittered, resized so its longer side is `size` (the preprocessor pads or crops)."""
    h, w = image.shape[:2]
    area = h * w * rng.uniform(0.15, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, max(8, round(np.sqrt(area / aspect)))))
    cw = int(min(w, max(8, round(np.sqrt(area * aspect)))))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    view = image[y:y + ch, x:x + cw].astype(np.float32)
    if rng.random() < 0.5:
        view = view[:, ::-1]
    if rng.random() < 0.2:
        view = np.repeat(view.mean(-1, keepdims=True), 3, axis=-1)
    elif rng.random() < 0.3:
        view = view[..., rng.permutation(3)]
    view = (view - view.mean()) * rng.uniform(0.7, 1.3) + view.mean() + rng.uniform(-30, 30)
    out = Image.fromarray(np.clip(view, 0, 255).astype(np.uint8), "RGB")
    scale = size / max(ch, cw)
    return out.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)


def crop_records(out_dir: str, n: int, seed: int, names=TRAINING_PHOTOS, size: int = 64) -> list[dict]:
    """`n` clean training records, each a random crop of one of `names` (in turn) with a question
    of `synthetic.QUESTIONS` and `PHOTO_ANSWER`; images under `out_dir/images/`. Ids contain the
    seed; the same seed gives the same files byte for byte."""
    rng = np.random.default_rng(seed)
    photos = [load(name) for name in names]
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for i in range(n):
        rid = f"photo{seed}-{i:06d}"
        rel = f"images/{rid}.png"
        save_png(crop(photos[i % len(photos)], rng, size), os.path.join(out_dir, rel))
        question = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
        records.append({"id": rid, "image": rel, "safe_level": 0, "safe_type": 6,
                        "conversations": [{"from": "human", "value": "<image>\n" + question},
                                          {"from": "gpt", "value": PHOTO_ANSWER}]})
    return records


PHOTO_SETS = {"all": lambda: {n: load(n) for n in SAMPLE_PHOTOS},
              "held_out": lambda: {n: load(n) for n in HELD_OUT_PHOTOS},
              "other": lambda: {n: load_other(n) for n in OTHER_PHOTOS}}


def write_labelled(out_dir: str, which: str = "all") -> str:
    """The photos of set `which` (`PHOTO_SETS`) whole, as clean labelled records (ids = names)
    in `out_dir/data.json`; returns its path."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for name, image in PHOTO_SETS[which]().items():
        rel = f"images/{name}.png"
        save_png(Image.fromarray(image, "RGB"), os.path.join(out_dir, rel))
        records.append({"id": name, "image": rel, "safe_level": 0, "safe_type": 6})
    return write_data_json(out_dir, records)


FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "output directory", required=True, flag_values=FLAGS)
flags.DEFINE_enum("set", "all", sorted(PHOTO_SETS),
                  "all 28 sample photos, the 9 the demo never saw, or the 4 of other packages", flag_values=FLAGS)


def _main(argv) -> None:
    del argv
    try:
        print(write_labelled(FLAGS.out, FLAGS.set))
    except ImportError as e:  # scikit-image missing: the message says how to install it
        raise cli.UsageError(str(e)) from e


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    main()
