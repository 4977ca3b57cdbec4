"""The report of a scan: OUT/summary.md, OUT/histogram.png, OUT/contact_sheet.png.

Streams OUT/verdicts.jsonl once (counts per level, type, level x type and policy action; the
`per_type` highest-risk images of each risky type, ranked by (level, P(level >= 1))) and
OUT/skipped.jsonl (counts per reason). Pictures are drawn with PIL; thumbnails are blurred
unless `blur=False`.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter

from PIL import Image, ImageDraw, ImageFilter, ImageOps

from safevlm_jax.data.images import decode_image
from safevlm_jax.safety.policy import ACTIONS
from safevlm_jax.safety.taxonomy import CLEAN, RISK_LEVELS, RISK_TYPES

THUMB, LABEL_W, PAD = 96, 150, 4


def collect(out: str, per_type: int = 8) -> dict:
    """Counts and, per risky type 0-5, the `per_type` highest-risk rows (risk level >= 1)."""
    from safevlm_jax.guard.collection import SKIPPED, VERDICTS, read_jsonl

    levels, types, actions, pairs = Counter(), Counter(), Counter(), Counter()
    top: dict[int, list] = {t: [] for t in range(CLEAN)}
    for n, row in enumerate(read_jsonl(os.path.join(out, VERDICTS))):
        lv, ty = row["risk_level"], row["risk_type"]
        levels[lv] += 1
        types[ty] += 1
        pairs[lv, ty] += 1
        actions[row.get("action", "none")] += 1
        if lv > 0 and ty is not None and ty != CLEAN:
            score = (lv, 1.0 - (row["risk_level_probs"][0] or 0.0), -n)
            item = (score, row["path"])
            heap = top[ty]
            (heapq.heappush if len(heap) < per_type else heapq.heappushpop)(heap, item)
    skipped = Counter(r["reason"] for r in read_jsonl(os.path.join(out, SKIPPED)))
    ranked = {t: [p for _, p in sorted(h, reverse=True)] for t, h in top.items()}
    return {"levels": levels, "types": types, "actions": actions, "pairs": pairs,
            "skipped": skipped, "top": ranked, "scored": sum(levels.values())}


def histogram_png(stats: dict, path: str) -> None:
    """Two bar charts: images per risk level and per risk type."""
    panels = [("risk level", [f"{i} {n}" for i, n in enumerate(RISK_LEVELS)],
               [stats["levels"][i] for i in range(len(RISK_LEVELS))]),
              ("risk type", [f"{i} {n}" for i, n in enumerate(RISK_TYPES)],
               [stats["types"][i] for i in range(len(RISK_TYPES))])]
    bar_h, width, label_w = 22, 640, 170
    height = sum(40 + bar_h * len(labels) for _, labels, _ in panels) + 10
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    y = 10
    for title, labels, counts in panels:
        draw.text((10, y), f"images per {title} (total {stats['scored']})", fill="black")
        y += 25
        top = max(max(counts), 1)
        for label, count in zip(labels, counts):
            length = int((width - label_w - 80) * count / top)
            draw.text((10, y + 4), label, fill="black")
            draw.rectangle([label_w, y + 2, label_w + length, y + bar_h - 4], fill=(200, 70, 60))
            draw.text((label_w + length + 6, y + 4), str(count), fill="black")
            y += bar_h
        y += 15
    img.save(path)


def contact_sheet_png(stats: dict, source, path: str, blur: bool = True) -> int:
    """One row per risky type with any risky image: its highest-risk thumbnails. Returns the
    number of thumbnails drawn (0: no image written)."""
    rows = [(t, paths) for t, paths in stats["top"].items() if paths]
    if not rows:
        if os.path.exists(path):  # from an earlier run of this report
            os.remove(path)
        return 0
    cols = max(len(p) for _, p in rows)
    img = Image.new("RGB", (LABEL_W + cols * (THUMB + PAD), len(rows) * (THUMB + PAD) + PAD), "white")
    draw = ImageDraw.Draw(img)
    drawn = 0
    for r, (kind, paths) in enumerate(rows):
        y = PAD + r * (THUMB + PAD)
        draw.text((PAD, y + THUMB // 2 - 6), f"{kind} {RISK_TYPES[kind]}", fill="black")
        for c, key in enumerate(paths):
            try:
                thumb = ImageOps.fit(decode_image(source.read(key)), (THUMB, THUMB))
            except (OSError, ValueError):  # changed or removed since it was scored
                continue
            if blur:
                thumb = thumb.filter(ImageFilter.GaussianBlur(THUMB / 10))
            img.paste(thumb, (LABEL_W + c * (THUMB + PAD), y))
            drawn += 1
    img.save(path)
    return drawn


def _table(title: str, names, counts: Counter, total: int) -> list[str]:
    lines = [f"| {title} | images | share |", "|---|---:|---:|"]
    for key, name in names:
        n = counts.get(key, 0)
        lines.append(f"| {name} | {n} | {n / total:.1%} |" if total else f"| {name} | {n} | - |")
    return lines


def write_report(out: str, source, blur: bool = True) -> dict:
    """Writes summary.md and the two PNGs into `out`; returns the collected stats."""
    stats = collect(out)
    total = stats["scored"]
    histogram_png(stats, os.path.join(out, "histogram.png"))
    thumbs = contact_sheet_png(stats, source, os.path.join(out, "contact_sheet.png"), blur)
    skipped = sum(stats["skipped"].values())
    lines = ["# Scan summary", "", f"Source: {source.description}", "",
             f"Images scored: **{total}**; skipped (unreadable): **{skipped}**"
             + (" (" + ", ".join(f"{r}: {n}" for r, n in sorted(stats["skipped"].items())) + ")"
                if skipped else ""), ""]
    lines += _table("risk level", [(i, f"{i} {n}") for i, n in enumerate(RISK_LEVELS)],
                    stats["levels"], total) + [""]
    lines += _table("risk type", [(i, f"{i} {n}") for i, n in enumerate(RISK_TYPES)]
                    + [(None, "unknown (non-finite)")] * (None in stats["types"]),
                    stats["types"], total) + [""]
    lines += _table("policy action", [(a, a) for a in ACTIONS], stats["actions"], total) + [""]
    lines += ["Level x type (rows: level, columns: type):", "",
              "| level | " + " | ".join(str(t) for t in range(len(RISK_TYPES))) + " |",
              "|---|" + "---:|" * len(RISK_TYPES)]
    for lv in range(len(RISK_LEVELS)):
        lines.append(f"| {lv} | " + " | ".join(str(stats["pairs"].get((lv, t), 0))
                                               for t in range(len(RISK_TYPES))) + " |")
    lines += ["", "![images per level and type](histogram.png)", ""]
    if thumbs:
        lines += [f"Highest-risk images per type ({'blurred' if blur else 'NOT blurred'}):", "",
                  "![highest-risk images per type](contact_sheet.png)", ""]
    else:
        lines += ["No image was scored risky (level >= 1 with a risky type): no contact sheet.", ""]
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return stats
