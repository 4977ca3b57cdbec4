"""TFDS builder: round trip of a synthetic set, fixed hash split, every bad-record kind skipped
with its reason in report.json, and --strict stopping at the record."""

import collections
import io
import json
import os
import struct
import zlib

import pytest
from PIL import Image

from safevlm_jax.data import build, synthetic
from safevlm_jax.data.pipeline import data_source
from safevlm_jax.data.records import load_json, parse_record, turns_from_json
from safevlm_jax.data.tfds_builder import build_dataset, is_validation, load_report


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    return str(root), synthetic.generate(str(root), n=40, seed=7, image_size=32)


def test_build_then_read_round_trip(synthetic_set, tmp_path):
    root, json_path = synthetic_set
    dataset_dir, report = build_dataset(json_path, root, str(tmp_path), validation_fraction=0.25)
    assert load_report(dataset_dir)["skipped"] == {} and report.total == 40
    records = {r.id: r for r in (parse_record(o, i) for i, o in enumerate(load_json(json_path)))}
    seen = {}
    for split in ("train", "validation"):
        for ex in data_source(dataset_dir, split):
            rid = ex["id"].decode()
            assert is_validation(rid, 0.25) == (split == "validation")
            seen[rid] = ex
    assert set(seen) == set(records)
    assert report.kept == {"train": sum(not is_validation(r, 0.25) for r in records),
                           "validation": sum(is_validation(r, 0.25) for r in records)}
    assert 0 < report.kept["validation"] < 40
    for rid, ex in seen.items():
        r = records[rid]
        with open(os.path.join(root, r.image), "rb") as f:
            assert bytes(ex["image"]) == f.read()
        assert turns_from_json(ex["conversations"].decode()) == r.turns
        assert (int(ex["safe_level"]), int(ex["safe_type"])) == (r.safe_level, r.safe_type)
        assert ex["image_path"].decode() == r.image


def test_existing_dataset_is_not_silently_reused(synthetic_set, tmp_path):
    root, json_path = synthetic_set
    build_dataset(json_path, root, str(tmp_path))
    with pytest.raises(FileExistsError, match="already exists"):
        build_dataset(json_path, root, str(tmp_path))
    build_dataset(json_path, root, str(tmp_path), overwrite=True)


def png_bytes(width=16, height=16):
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(side):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def conv(question="<image>\nWhat is this?", reply="A shape."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]


def record(rid, image="good.png", level=1, type_=2, conversations=None):
    return {"id": rid, "image": image, "safe_level": level, "safe_type": type_,
            "conversations": conv() if conversations is None else conversations}


@pytest.fixture
def bad_set(tmp_path):
    """A JSON file with two good records and one record of each bad kind (id = reason)."""
    root = tmp_path / "images"
    root.mkdir()
    (root / "good.png").write_bytes(png_bytes())
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # the signature, then junk
    (root / "truncated.png").write_bytes(png_bytes(64, 64)[:60])
    (root / "bomb.png").write_bytes(bomb_png(100_000))
    (root / "drawing.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\n%%EOF\n")  # EPS named .png
    (root / "strip.png").write_bytes(png_bytes(2050, 10))
    (tmp_path / "outside.png").write_bytes(png_bytes())
    os.symlink(tmp_path / "outside.png", root / "link.png")
    records = [
        record("good-1"), record("good-2", level=0, type_=6),
        record("missing_image", image="nope.png"),
        record("corrupt_image", image="garbage.png"),
        record("corrupt_image#2", image="truncated.png"),
        record("image_path_escapes_root", image="../outside.png"),
        record("absolute_image_path", image=str(tmp_path / "outside.png")),
        record("image_symlink_escapes_root", image="link.png"),
        record("image_too_large", image="bomb.png"),
        record("unsupported_image_format", image="drawing.png"),
        record("aspect_ratio_too_large", image="strip.png"),
        record("safe_level_out_of_range", level=4),
        record("safe_level_wrong_type", level="2"),
        record("safe_type_out_of_range", type_=-1),
        record("safe_type_wrong_type", type_=True),
        record("missing_image_token", conversations=conv(question="What is this?")),
        record("multiple_image_tokens", conversations=conv(question="<image>\n<image> What?")),
        record("empty_conversation", conversations=[]),
        record("no_assistant_turn", conversations=conv()[:1]),
        record("non_utf8_text", conversations=conv(reply="@@BAD@@")),
        record("good-1"),  # duplicate_id
    ]
    path = tmp_path / "data.json"
    path.write_bytes(json.dumps(records).encode().replace(b"@@BAD@@", b"\xff\xfe bytes"))
    return str(path), str(root)


def test_each_bad_record_is_skipped_with_its_reason(bad_set, tmp_path):
    json_path, root = bad_set
    dataset_dir, report = build_dataset(json_path, root, str(tmp_path / "out"))
    saved = load_report(dataset_dir)
    expected = collections.Counter(rid.split("#")[0] for rid in
                                   [r["id"] for r in json.loads(open(json_path, "rb").read().decode(errors="replace"))]
                                   if not rid.startswith("good"))
    expected["duplicate_id"] = 1
    assert saved["skipped"] == dict(expected)
    assert saved["total"] == 21 and sum(saved["kept"].values()) == 2
    by_record = {(s["record"], s["reason"]) for s in saved["skipped_records"]}
    assert ("good-1", "duplicate_id") in by_record and ("corrupt_image#2", "corrupt_image") in by_record
    splits = [name for name, n in saved["kept"].items() if n]  # an empty split is not written
    ids = {ex["id"].decode() for split in splits for ex in data_source(dataset_dir, split)}
    assert ids == {"good-1", "good-2"}


@pytest.mark.parametrize("bad_id", ["image_symlink_escapes_root", "safe_level_wrong_type", "non_utf8_text"])
def test_strict_build_stops_naming_the_record(bad_set, tmp_path, bad_id, capsys):
    json_path, root = bad_set
    records = json.loads(open(json_path, "rb").read().decode("utf-8", errors="surrogateescape"))
    keep = [r for r in records if r["id"] in ("good-1", bad_id)][:2]
    path = tmp_path / "strict.json"
    path.write_bytes(json.dumps(keep, ensure_ascii=False).encode("utf-8", errors="surrogateescape"))
    with pytest.raises(SystemExit) as e:
        build.main(["--json", str(path), "--image_root", root, "--out", str(tmp_path / "out"), "--strict"])
    assert e.value.code == 2 and f"error: {path}: record {bad_id}: {bad_id}" in capsys.readouterr().err


def test_hash_split_is_fixed():
    ids = [f"r{i}" for i in range(2000)]
    frac = sum(is_validation(i, 0.1) for i in ids) / len(ids)
    assert 0.07 < frac < 0.13
    assert [is_validation(i, 0.1) for i in ids] == [is_validation(i, 0.1) for i in reversed(ids)][::-1]
    assert is_validation("000123", 0.5) == (int.from_bytes(
        __import__("hashlib").sha256(b"000123").digest()[:8], "big") < 2**63)
