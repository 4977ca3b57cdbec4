"""`python -m safevlm_jax.scan`: JSONL + report, bad images counted, resume, part merging."""

import json
import struct

import numpy as np
import pytest
from PIL import Image

from safevlm_jax import scan as scan_cli
from safevlm_jax.guard import collection as scan, model as guard_lib
from tests.guard_helpers import tiny_checkpoint

FIELDS = {"path", "risk_level", "risk_type", "risk_type_name", "risk_level_probs",
          "risk_type_probs", "action"}


def bomb_bmp(width: int = 10_000, height: int = 10_000) -> bytes:
    """A 54-byte BMP header claiming width x height 24-bit pixels, with no pixel data."""
    row = (width * 3 + 3) // 4 * 4
    return (b"BM" + struct.pack("<IHHI", 54 + row * height, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, row * height, 2835, 2835, 0, 0))


@pytest.fixture
def tree(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(6):
        folder = root / ("a" if i % 2 else "b") / "deep"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), np.uint8)).save(folder / f"img{i}.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "bomb.bmp").write_bytes(bomb_bmp())
    (root / "drawing.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\n%%EOF\n")  # EPS named .png: never opened as EPS
    (root / "notes.txt").write_text("not an image file name: never listed")
    return root


@pytest.fixture
def guard_calls(monkeypatch):
    """Counts the images each Guard call scores."""
    calls = []
    original = guard_lib.Guard.__call__

    def counted(self, pixel_values, *args, **kwargs):
        calls.append(len(pixel_values))
        return original(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(guard_lib.Guard, "__call__", counted)
    return calls


def test_scan_cli_writes_verdicts_and_report_and_counts_bad_images(tree, tmp_path, capsys, guard_calls):
    out = tmp_path / "out"
    scan_cli.main(["--checkpoint", tiny_checkpoint(), "--images", str(tree), "--out", str(out),
               "--batch_size", "4", "--no_progress"])
    assert capsys.readouterr().out.startswith("total=9 already_done=0 scored=6 skipped=3")
    rows = list(scan.read_jsonl(out / "verdicts.jsonl"))
    assert len(rows) == 6 and all(set(r) == FIELDS for r in rows)
    for r in rows:
        assert abs(sum(r["risk_level_probs"]) - 1) < 1e-4 and abs(sum(r["risk_type_probs"]) - 1) < 1e-4
        assert r["risk_level"] == int(np.argmax(r["risk_level_probs"]))
    skipped = {r["path"].split("/")[-1]: r["reason"] for r in scan.read_jsonl(out / "skipped.jsonl")}
    assert skipped == {"corrupt.jpg": "corrupt_image", "bomb.bmp": "image_too_large",
                       "drawing.png": "unsupported_image_format"}
    summary = (out / "summary.md").read_text()
    assert "Images scored: **6**; skipped (unreadable): **3**" in summary
    assert "corrupt_image: 1" in summary and "image_too_large: 1" in summary
    assert "unsupported_image_format: 1" in summary
    assert Image.open(out / "histogram.png").size[0] > 0
    assert sum(guard_calls) == 6  # bad images never reach the model


def test_scan_resume_skips_done_images_and_repairs_a_torn_line(tree, tmp_path, guard_calls):
    out, ckpt = tmp_path / "out", tiny_checkpoint()
    first = scan.scan(ckpt, str(tree / "a" / "**" / "*.png"), str(out), batch_size=8, progress=False)
    assert first["scored"] == 3 and sum(guard_calls) == 3
    with open(out / "verdicts.jsonl", "a") as f:
        f.write('{"path": "half a line from a cras')  # killed mid-write
    second = scan.scan(ckpt, str(tree), str(out), batch_size=8, progress=False)
    assert (second["already_done"], second["scored"], second["skipped"]) == (3, 3, 3)
    assert sum(guard_calls) == 6
    paths = [r["path"] for r in scan.read_jsonl(out / "verdicts.jsonl")]
    assert len(paths) == len(set(paths)) == 6
    assert (out / "verdicts.jsonl").read_text().count("\n") == 6  # the torn line is gone
    third = scan.scan(ckpt, str(tree), str(out), batch_size=8, progress=False)
    assert (third["already_done"], third["scored"], third["skipped"]) == (9, 0, 0)
    assert sum(guard_calls) == 6  # nothing left: the model was not called again


def test_merge_parts_writes_each_path_once(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "verdicts.jsonl").write_text('{"path": "x"}\n')
    (tmp_path / "parts" / "verdicts-00000-of-00002.jsonl").write_text('{"path": "a"}\n{"path": "x"}\n')
    (tmp_path / "parts" / "verdicts-00001-of-00002.jsonl").write_text('{"path": "b"}\n')
    (tmp_path / "parts" / "skipped-00001-of-00002.jsonl").write_text('{"path": "c", "reason": "r"}\n')
    scan.merge_parts(str(tmp_path))
    assert [r["path"] for r in scan.read_jsonl(tmp_path / "verdicts.jsonl")] == ["x", "a", "b"]
    assert [r["path"] for r in scan.read_jsonl(tmp_path / "skipped.jsonl")] == ["c"]
    assert not list((tmp_path / "parts").iterdir())


def test_scan_cli_invalid_policy_exits_with_the_field(tree, tmp_path, capsys):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"rules": {"privacy": {"refuse": 5}}}))
    with pytest.raises(SystemExit) as e:
        scan_cli.main(["--checkpoint", "unused", "--images", str(tree), "--out", str(tmp_path / "o"),
                   "--policy", str(policy)])
    assert e.value.code == 2
    assert "rules.privacy.refuse: expected a level 0-3" in capsys.readouterr().err
