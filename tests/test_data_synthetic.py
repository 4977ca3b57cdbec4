"""Synthetic generator: reproducible per seed, disjoint across seeds, labels visible in the
image and consistent with the answers."""

import os

import numpy as np
from PIL import Image

from safevlm_jax.data import synthetic
from safevlm_jax.data.synthetic.__main__ import main
from safevlm_jax.data.records import load_json, parse_record
from safevlm_jax.safety.taxonomy import RISK_TYPES


def files(directory):
    out = {}
    for dirpath, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def test_same_seed_gives_identical_files_and_other_seeds_disjoint_ids(tmp_path):
    main(["--out", str(tmp_path / "a"), "--n", "12", "--seed", "1"])
    main(["--out", str(tmp_path / "b"), "--n", "12", "--seed", "1"])
    main(["--out", str(tmp_path / "c"), "--n", "12", "--seed", "11"])
    assert files(tmp_path / "a") == files(tmp_path / "b")
    ids = {d: {r["id"] for r in load_json(tmp_path / d / "data.json")} for d in "ac"}
    assert len(ids["a"]) == len(ids["c"]) == 12 and not ids["a"] & ids["c"]


def test_labels_are_visible_and_answers_follow_them(tmp_path):
    path = synthetic.generate(str(tmp_path), n=60, seed=4, image_size=64)
    records = [parse_record(r, i) for i, r in enumerate(load_json(path))]  # all valid
    fill_by_level = {0: (0.65, 0.85), 1: (0.4, 0.6), 2: (0.85, 1.0), 3: (0.05, 0.45)}
    assert {r.safe_level for r in records} == {0, 1, 2, 3}
    for r in records:
        assert (r.safe_level == 0) == (r.safe_type == 6)
        pixels = np.asarray(Image.open(tmp_path / r.image))
        shape = np.all(pixels == synthetic.COLORS[r.safe_type], axis=-1)
        ys, xs = np.nonzero(shape)
        fill = shape.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # shape area / bounding box
        lo, hi = fill_by_level[r.safe_level]
        assert lo <= fill <= hi, (r.id, r.safe_level, fill)
        reply = r.turns[1].value
        assert reply.startswith("I'm sorry, but I can't") == (r.safe_level == 3)
        if r.safe_level in (1, 2):
            assert RISK_TYPES[r.safe_type] in reply and "with care" in reply
