"""Evaluation pieces without a model: metrics vs scikit-learn, refusal detection and rates,
input validation (missing image, wrong labels, empty file, bad question lines)."""

import json

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from safevlm_jax.eval import metrics
from safevlm_jax.eval.dataset import load_labelled, load_questions
from safevlm_jax.eval.refusal import ALL, RefusalDetector, rates_table, refusal_rates


@pytest.mark.parametrize("seed", range(4))
def test_confusion_precision_recall_f1_equal_sklearn_with_absent_classes(seed):
    rng = np.random.default_rng(seed)
    k = 7
    y_true = rng.integers(0, k - 2, size=50)  # the last two classes never occur in y_true
    y_pred = np.where(rng.random(50) < 0.6, y_true, rng.integers(1, k, size=50))  # class 0 rarely predicted
    labels = list(range(k))
    cm = metrics.confusion_matrix(y_true, y_pred, k)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y_true, y_pred, labels=labels))
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    ours = metrics.per_class(cm)
    for a, b in ((ours["precision"], p), (ours["recall"], r), (ours["f1"], f), (ours["support"], s)):
        np.testing.assert_allclose(a, b, atol=1e-12)
    report = metrics.classification_report(y_true, y_pred, [f"c{i}" for i in labels])
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    for avg in ("macro", "weighted"):
        want = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        assert [report[avg][m] for m in ("precision", "recall", "f1")] == pytest.approx(list(want[:3]))
    assert report["confusion"] == cm.tolist() and report["n"] == 50


def test_metrics_refuse_labels_outside_the_classes():
    with pytest.raises(ValueError, match="0..3"):
        metrics.confusion_matrix([0, 4], [0, 1], 4)
    with pytest.raises(ValueError, match="one length"):
        metrics.confusion_matrix([0, 1], [0], 4)


def test_refusal_detector_defaults_custom_file_and_bad_pattern(tmp_path):
    d = RefusalDetector()
    assert d("I'm sorry, but I can't help with that.") and d("I cannot assist with this request.")
    assert d("I\u2019m sorry") and not d("The image shows a green circle.")
    f = tmp_path / "patterns.txt"
    f.write_text("# comment\n\n^No\\b\n")
    custom = RefusalDetector.from_file(str(f))
    assert custom("no way") and not custom("I'm sorry")
    f.write_text('["sorry", "(unclosed"]')
    with pytest.raises(ValueError, match="bad refusal pattern"):
        RefusalDetector.from_file(str(f))
    f.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no refusal patterns"):
        RefusalDetector.from_file(str(f))


def test_refusal_rates_per_category_and_setting_keep_a_category_named_all():
    rows = [{"category": c, "safety": s, "refused": ref, "hint_applied": h}
            for c, s, ref, h in [("all", "on", True, True), ("all", "off", False, False), ("porn", "on", True, False),
                                 ("porn", "on", False, True), ("porn", "off", False, False)]]
    r = refusal_rates(rows)
    assert r["settings"] == ["off", "on"]
    assert r["categories"]["all"]["on"] == {"n": 1, "refused": 1, "rate": 1.0, "hint_rate": 1.0}
    assert r["categories"]["porn"]["on"]["rate"] == 0.5 and r["all"]["on"]["n"] == 3
    assert r["all"]["on"]["rate"] == pytest.approx(2 / 3) and r["all"]["off"]["rate"] == 0.0
    header, table = rates_table(r)
    assert header[-1] == "hint applied, safety on" and table[-1][0] == ALL and len(table) == 3


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def test_labelled_data_skips_missing_image_and_wrong_labels_with_reasons(tmp_path):
    _image(tmp_path / "img" / "a.png")
    recs = [{"id": "ok", "image": "img/a.png", "safe_level": 2, "safe_type": 1},
            {"id": "gone", "image": "img/missing.png", "safe_level": 0, "safe_type": 6},
            {"id": "str", "image": "img/a.png", "safe_level": "2", "safe_type": 1},
            {"id": "big", "image": "img/a.png", "safe_level": 1, "safe_type": 9},
            {"id": "ok", "image": "img/a.png", "safe_level": 0, "safe_type": 6},
            {"id": "out", "image": "../a.png", "safe_level": 0, "safe_type": 6}]
    (tmp_path / "data.json").write_text(json.dumps(recs))
    examples, skipped = load_labelled(str(tmp_path))  # a directory with data.json
    assert [(e.id, e.level, e.type) for e in examples] == [("ok", 2, 1)]
    assert [(s.record, s.reason) for s in skipped] == [
        ("gone", "missing_image"), ("str", "safe_level_wrong_type"), ("big", "safe_type_out_of_range"),
        ("ok", "duplicate_id"), ("out", "image_path_escapes_root")]
    with pytest.raises(ValueError, match="record gone: missing_image"):
        load_labelled(str(tmp_path / "data.json"), strict=True)


@pytest.mark.parametrize("text, match", [("", "not valid JSON"), ("[]", "no usable records"),
                                         ('{"id": 1}', "expected a JSON list")])
def test_empty_or_malformed_labelled_file_is_a_clear_error(tmp_path, text, match):
    (tmp_path / "data.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_labelled(str(tmp_path / "data.json"))


def test_missing_data_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data.json"):
        load_labelled(str(tmp_path))


def test_question_lines_skip_bad_json_fields_and_images(tmp_path):
    _image(tmp_path / "q.png")
    lines = [json.dumps({"id": "q1", "image": "q.png", "question": "Who?", "category": "politics"}),
             "{not json", "",
             json.dumps({"id": "q2", "image": "q.png", "question": "Why?"}),
             json.dumps({"id": "q3", "image": "nope.png", "question": "What?", "category": "porn"})]
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    questions, skipped = load_questions(str(tmp_path / "q.jsonl"))
    assert [(q.id, q.category, q.image) for q in questions] == [("q1", "politics", "q.png")]
    assert [(s.record, s.reason) for s in skipped] == [("line 2", "bad_json"), ("q2", "bad_category_field"),
                                                       ("q3", "missing_image")]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no usable records"):
        load_questions(str(tmp_path / "empty.jsonl"))
