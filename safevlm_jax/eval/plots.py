"""The evaluation figures, drawn with matplotlib's object API (`Figure`, no pyplot), so no
global backend state is touched and nothing needs a display."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def _save(fig: Figure, path: str) -> str:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def confusion_png(cm: np.ndarray, names: Sequence[str], title: str, path: str) -> str:
    """Confusion matrix [K, K] (row = true) as a heat map of row-normalised rates, annotated
    with counts."""
    k = len(names)
    rows = cm.sum(axis=1, keepdims=True)
    rates = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
    fig = Figure(figsize=(1.2 + 0.75 * k, 1.0 + 0.7 * k))
    ax = fig.add_subplot()
    im = ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    return _save(fig, path)


def scatter_grid(points: Mapping[str, np.ndarray], colourings: Mapping[str, tuple[np.ndarray, Sequence[str]]],
                 path: str, title: str) -> str:
    """One panel per (feature set, colouring), like the paper's Fig. 4.

    points: {feature set: [n, 2]}; colourings: {label name: (labels [n] int, class names)}.
    Rows are colourings, columns feature sets.
    """
    sets, kinds = list(points), list(colourings)
    fig = Figure(figsize=(4.2 * len(sets) + 1.8, 4.0 * len(kinds)))
    axes = fig.subplots(len(kinds), len(sets), squeeze=False)
    for r, kind in enumerate(kinds):
        labels, names = colourings[kind]
        colours = _palette(len(names))
        for c, name in enumerate(sets):
            ax, xy = axes[r][c], points[name]
            for k, cls in enumerate(names):
                sel = labels == k
                if sel.any():
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=10, color=colours[k], label=cls, alpha=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} — by {kind}", fontsize=10)
        axes[r][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, markerscale=1.5)
    fig.suptitle(title)
    return _save(fig, path)


def grouped_bars(groups: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str, title: str,
                 path: str) -> str:
    """Bars per group (e.g. category), one colour per series (e.g. safety on / off); values in [0, 1]."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(groups)), 3.8))
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]
