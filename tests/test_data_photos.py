"""The demo's clean photos: only files bundled with scikit-image, a held-out part kept apart,
crops reproducible per seed, labelled output readable by the evaluation code."""

import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

from safevlm_jax.data import photos
from safevlm_jax.data.records import load_json, parse_record
from safevlm_jax.eval.dataset import load_labelled
from tests.test_data_synthetic import files


def test_sample_photos_are_28_bundled_files_split_into_training_and_held_out():
    data_dir = os.path.dirname(skimage.data.__file__)
    assert len(photos.SAMPLE_PHOTOS) == 28
    for name, (loader, filename, _) in photos.SAMPLE_PHOTOS.items():
        assert callable(getattr(skimage.data, loader)), name
        assert filename is None or os.path.isfile(os.path.join(data_dir, filename)), (name, filename)
    assert set(photos.TRAINING_PHOTOS) | set(photos.HELD_OUT_PHOTOS) == set(photos.SAMPLE_PHOTOS)
    assert not set(photos.TRAINING_PHOTOS) & set(photos.HELD_OUT_PHOTOS)
    # same file (cat is chelsea) or same scene (the two motorcycle views): same side of the split
    by_file = {}
    for name, (loader, filename, _) in photos.SAMPLE_PHOTOS.items():
        by_file.setdefault(filename or name, set()).add(name in photos.HELD_OUT_PHOTOS)
        by_file.setdefault(loader, set()).add(name in photos.HELD_OUT_PHOTOS)
    assert all(len(sides) == 1 for sides in by_file.values()), by_file


def test_photos_load_as_rgb_uint8_and_a_missing_file_is_refused_not_fetched(monkeypatch):
    for name in photos.SAMPLE_PHOTOS:
        image = photos.load(name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3, name
        assert image.shape[0] >= 25 and image.shape[1] >= 25 and np.ptp(image) > 50, name
    np.testing.assert_array_equal(photos.load("binary_blobs"), photos.load("binary_blobs"))  # drawn with a seed
    for name in photos.OTHER_PHOTOS:
        image = photos.load_other(name)
        assert image.dtype == np.uint8 and image.shape[-1] == 3 and min(image.shape[:2]) >= 100, name
    monkeypatch.setitem(photos.SAMPLE_PHOTOS, "eagle", ("eagle", "eagle.png", None))  # a pooch download
    with pytest.raises(FileNotFoundError, match="would fetch it"):
        photos.load("eagle")


def test_to_rgb_converts_every_loader_layout():
    grey = np.array([[0, 255]], np.uint8)
    np.testing.assert_array_equal(photos.to_rgb(grey), np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(photos.to_rgb(np.array([[False, True]]))[0, :, 0], [0, 255])
    np.testing.assert_array_equal(photos.to_rgb(np.array([[0.0, 0.5, 1.0]]))[0, :, 1], [0, 128, 255])
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 255
    assert photos.to_rgb(rgba).shape == (2, 2, 3) and photos.to_rgb(rgba).max() == 0
    with pytest.raises(ValueError, match="shape"):
        photos.to_rgb(np.zeros((2, 2, 2), np.uint8))


def test_crop_records_are_clean_reproducible_and_only_from_training_photos(tmp_path):
    a = photos.crop_records(str(tmp_path / "a"), 6, seed=3, names=photos.TRAINING_PHOTOS[:3])
    b = photos.crop_records(str(tmp_path / "b"), 6, seed=3, names=photos.TRAINING_PHOTOS[:3])
    c = photos.crop_records(str(tmp_path / "c"), 6, seed=4, names=photos.TRAINING_PHOTOS[:3])
    assert a == b and files(tmp_path / "a") == files(tmp_path / "b")
    assert not {r["id"] for r in a} & {r["id"] for r in c}
    assert files(tmp_path / "a") != files(tmp_path / "c")
    for i, r in enumerate(a):
        record = parse_record(r, i)
        assert (record.safe_level, record.safe_type) == (0, 6)
        assert record.turns[1].value == photos.PHOTO_ANSWER
        with Image.open(tmp_path / "a" / r["image"]) as im:
            assert im.mode == "RGB" and max(im.size) == 64 and min(im.size) >= 40
    assert photos.crop_records(str(tmp_path / "d"), 2, seed=0)  # defaults: TRAINING_PHOTOS


@pytest.mark.parametrize("which, expected", [("held_out", photos.HELD_OUT_PHOTOS), ("other", tuple(photos.OTHER_PHOTOS))])
def test_cli_writes_whole_photos_as_clean_labelled_data(which, expected, tmp_path):
    photos.main(["--out", str(tmp_path), "--set", which])
    examples, skipped = load_labelled(str(tmp_path))
    assert not skipped and [e.id for e in examples] == list(expected)
    assert {(e.level, e.type) for e in examples} == {(0, 6)}
    first = load_json(tmp_path / "data.json")[0]
    with Image.open(tmp_path / first["image"]) as im:
        loaded = photos.load(first["id"]) if which == "held_out" else photos.load_other(first["id"])
        np.testing.assert_array_equal(np.asarray(im), loaded)


def test_cli_without_scikit_image_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(__import__("sys").modules, "skimage.data", None)  # import fails
    with pytest.raises(SystemExit) as e:
        photos.main(["--out", str(tmp_path), "--set", "all"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: scikit-image is needed") and err.count("\n") == 1
