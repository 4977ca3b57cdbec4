"""Classification metrics in numpy (checked against scikit-learn in the tests).

Conventions follow `sklearn.metrics` with `labels=range(num_classes)` and `zero_division=0`:
confusion rows are true classes, columns predicted; a class with no prediction has
precision 0, one with no example recall 0, and F1 is 0 when precision + recall is 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _check(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of one length, got {t.shape} and {p.shape}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} must hold integer classes in 0..{num_classes - 1}")
    return t.astype(np.int64), p.astype(np.int64)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """y_true, y_pred [n] int -> counts [num_classes, num_classes] int64 (row = true class)."""
    t, p = _check(y_true, y_pred, num_classes)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, np.float64), where=den > 0)


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Confusion matrix [K, K] -> precision, recall, f1 [K] float64 and support [K] int64."""
    tp = np.diag(cm).astype(np.float64)
    precision = _safe_div(tp, cm.sum(axis=0).astype(np.float64))
    recall = _safe_div(tp, cm.sum(axis=1).astype(np.float64))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": cm.sum(axis=1)}


def accuracy(y_true, y_pred) -> float:
    """Fraction of equal entries (nan for no examples)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(t == p)) if t.size else float("nan")


def classification_report(y_true, y_pred, names: Sequence[str]) -> dict:
    """Everything one head's table needs, JSON-ready: accuracy, macro and support-weighted
    P/R/F1, per-class rows {name, precision, recall, f1, support} and the confusion matrix."""
    cm = confusion_matrix(y_true, y_pred, len(names))
    pc = per_class(cm)
    support = pc["support"].astype(np.float64)
    weights = support / support.sum() if support.sum() else support

    def avg(w: np.ndarray) -> dict[str, float]:
        return {k: float(np.sum(pc[k] * w)) for k in ("precision", "recall", "f1")}

    return {
        "n": int(cm.sum()),
        "accuracy": accuracy(y_true, y_pred),
        "macro": avg(np.full(len(names), 1 / len(names))),
        "weighted": avg(weights),
        "per_class": [{"name": n, "precision": float(pc["precision"][i]), "recall": float(pc["recall"][i]),
                       "f1": float(pc["f1"][i]), "support": int(pc["support"][i])}
                      for i, n in enumerate(names)],
        "confusion": cm.tolist(),
    }
