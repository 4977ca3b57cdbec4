"""The eval commands end to end on a tiny random checkpoint and synthetic data: files written,
PNGs valid and non-empty, metrics consistent with scikit-learn on the saved predictions,
the report assembled with the paper's rows, bad inputs reported clearly."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from safevlm_jax.data.synthetic import generate as synthetic
from safevlm_jax.eval import generate, head, report, tsne
from safevlm_jax.checkpoint.demo import random_checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One checkpoint, 16 synthetic images, 3 questions and the outputs of every command."""
    root = tmp_path_factory.mktemp("eval")
    ckpt = random_checkpoint(str(root / "ckpt"))  # the sample CLI's tiny random fallback
    data = root / "syn"
    synthetic(str(data), 16, seed=0, image_size=32)
    recs = json.loads((data / "data.json").read_text())
    with open(data / "questions.jsonl", "w") as f:
        for i, r in enumerate(recs[:3]):
            f.write(json.dumps({"id": r["id"], "image": r["image"], "question": "What is this?",
                                "category": ("politics", "porn")[i % 2]}) + "\n")
    out = {k: str(root / k) for k in ("head", "tsne", "gen", "report")}
    head.main(["--checkpoint", ckpt, "--data", str(data), "--out", out["head"], "--batch_size", "8",
               "--no_progress"])
    tsne.main(["--checkpoint", ckpt, "--data", str(data / "data.json"), "--out", out["tsne"], "--batch_size", "8",
               "--no_progress"])
    generate.main(["--checkpoint", ckpt, "--questions", str(data / "questions.jsonl"), "--out",
                   os.path.join(out["gen"], "answers.jsonl"), "--max_new_tokens", "2", "--batch_size", "4",
                   "--no_progress"])
    return {"ckpt": ckpt, "data": data, "recs": recs, **out}


def assert_png(path):
    assert os.path.getsize(path) > 1000
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_head_metrics_agree_with_sklearn_on_its_predictions(runs):
    m = json.loads(open(os.path.join(runs["head"], head.METRICS)).read())
    preds = [json.loads(line) for line in open(os.path.join(runs["head"], head.PREDICTIONS))]
    assert m["n"] == len(preds) == 16 and m["skipped"] == []
    assert [p["id"] for p in preds] == [r["id"] for r in runs["recs"]]
    for key, k in (("level", 4), ("type", 7)):
        y, yhat = [p[f"safe_{key}"] for p in preds], [p[f"pred_{key}"] for p in preds]
        assert yhat == [int(np.argmax(p[f"{key}_probs"])) for p in preds]
        assert m[key]["accuracy"] == pytest.approx(skm.accuracy_score(y, yhat))
        assert m[key]["confusion"] == skm.confusion_matrix(y, yhat, labels=list(range(k))).tolist()
        f1 = skm.f1_score(y, yhat, labels=list(range(k)), average=None, zero_division=0)
        assert [c["f1"] for c in m[key]["per_class"]] == pytest.approx(list(f1))
        assert_png(os.path.join(runs["head"], f"confusion_{key}.png"))


def test_head_probabilities_equal_the_guard_on_each_image_alone(runs):
    from safevlm_jax.checkpoint.assets import image_config
    from safevlm_jax.eval.dataset import load_pixels
    from safevlm_jax.guard.model import Guard

    guard = Guard.from_checkpoint(runs["ckpt"])
    p = json.loads(open(os.path.join(runs["head"], head.PREDICTIONS)).readline())
    pixels = load_pixels([str(runs["data"] / runs["recs"][0]["image"])], image_config(runs["ckpt"], guard.config))
    level, kind = guard(pixels)
    np.testing.assert_allclose(p["level_probs"], level[0], atol=1e-5)
    np.testing.assert_allclose(p["type_probs"], kind[0], atol=1e-5)


def test_head_reports_bad_records_and_fails_clearly_on_empty_file(runs, tmp_path, capsys):
    recs = runs["recs"][:3] + [{**runs["recs"][3], "id": "x1", "image": "images/none.png"},
                               {**runs["recs"][4], "id": "x2", "safe_level": 7}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(recs))
    out = str(tmp_path / "out")
    head.main(["--checkpoint", runs["ckpt"], "--data", str(path), "--image_root", str(runs["data"]),
               "--out", out, "--batch_size", "8", "--no_progress"])
    m = json.loads(open(os.path.join(out, head.METRICS)).read())
    assert m["n"] == 3 and [(s["record"], s["reason"]) for s in m["skipped"]] == [
        ("x1", "missing_image"), ("x2", "safe_level_out_of_range")]
    assert "warning: skipped 1 records (missing_image): x1" in capsys.readouterr().err
    path.write_text("")
    with pytest.raises(SystemExit) as e:
        head.main(["--checkpoint", runs["ckpt"], "--data", str(path), "--out", out])
    assert e.value.code == 2 and "bad.json: not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        head.main(["--checkpoint", str(tmp_path), "--data", str(path), "--out", out])
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_tsne_grid_and_silhouettes_match_sklearn_on_saved_points(runs):
    r = json.loads(open(os.path.join(runs["tsne"], "tsne.json")).read())
    points = np.load(os.path.join(runs["tsne"], "tsne_points.npz"))
    assert r["n"] == 16 and r["perplexity"] == 5.0 and set(r["silhouette"]) == set(tsne.FEATURE_SETS)
    assert r["dims"] == {"CLIP": 32, "safety projector": 64}
    for name in tsne.FEATURE_SETS:
        xy = points[name.replace(" ", "_")]
        assert xy.shape == (16, 2) and np.isfinite(xy).all()
        for kind in ("level", "type"):
            got = r["silhouette"][name][kind]
            assert got["tsne"] == pytest.approx(skm.silhouette_score(xy, points[kind]), abs=1e-5)
            assert -1 <= got["features"] <= 1
    assert_png(os.path.join(runs["tsne"], "tsne.png"))


def test_generate_answers_both_settings_and_refusal_report(runs, tmp_path):
    answers = os.path.join(runs["gen"], "answers.jsonl")
    rows = [json.loads(line) for line in open(answers)]
    assert [(r["id"], r["safety"]) for r in rows] == [(q["id"], s) for s in ("off", "on") for q in runs["recs"][:3]]
    for r in rows:
        on = r["safety"] == "on"
        assert isinstance(r["answer"], str) and isinstance(r["refused"], bool)
        assert (r["risk_level"] in range(4)) if on else (r["risk_level"] is None and not r["hint_applied"])
        assert on == (r["risk_type_probs"] is not None)
    rep = json.loads(open(os.path.join(runs["gen"], "answers_refusal.json")).read())
    assert rep["settings"] == ["off", "on"] and set(rep["categories"]) == {"politics", "porn"}
    assert rep["all"]["on"]["n"] == 3 and "refusal rate, safety on" in open(answers[:-6] + "_refusal.md").read()
    assert_png(answers[:-6] + "_refusal.png")
    patterns = tmp_path / "all.txt"
    patterns.write_text(".*\n")
    copy = tmp_path / "answers.jsonl"
    copy.write_text(open(answers).read())
    generate.main(["--out", str(copy), "--rescore", "--refusal_patterns", str(patterns)])
    again = json.loads(open(tmp_path / "answers_refusal.json").read())
    assert again["all"]["on"]["rate"] == again["all"]["off"]["rate"] == 1.0 and again["patterns"] == [".*"]


def test_report_assembles_every_run_with_marked_paper_rows(runs, tmp_path, capsys):
    report.main(["--runs", runs["head"], runs["tsne"], runs["gen"], "--out", runs["report"]])
    md = open(os.path.join(runs["report"], "report.md")).read()
    page = open(os.path.join(runs["report"], "report.html")).read()
    for section in ("Safety head", "t-SNE", "Refusal rates", "Published results (paper"):
        assert section in md and section in page
    assert "| paper: SafeVLM-13B+LoRA | 8.46 |" in md and "paper: SafeVLM (arXiv 2405.13581)" in md
    figures = [line.split("](")[1][:-1] for line in md.splitlines() if line.startswith("![")]
    assert len(figures) == 4 and page.count("<img") == 4
    for fig in figures:
        assert_png(os.path.join(runs["report"], fig))
    with pytest.raises(SystemExit):
        report.main(["--runs", str(tmp_path), "--out", str(tmp_path / "r")])
    assert "no evaluation results" in capsys.readouterr().err
