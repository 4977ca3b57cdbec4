"""Synthetic SafeVLM data whose risk labels are visible in the image.

`generate(out_dir, n, seed)` writes `out_dir/data.json` (SafeVLM records, docs/architecture.md)
and `out_dir/images/*.png`; `python -m safevlm_jax.data.synthetic --out DIR --n N --seed S`
(`__main__.py`) is its command line. Each image is a noisy background with one shape: the shape
gives the risk level (circle 0, triangle 1, square 2, cross 3), the colour and a glyph letter
give the risk type (green "C" = 6 clean; six other colours/letters for types 0-5). Level 0 goes
with type 6. Answers follow the labels: a description for clean images, a cautious answer for
levels 1-2, and a refusal starting "I'm sorry, but I can't" for level 3. Ids contain the seed,
so different seeds never share an id, and the same seed reproduces the same files byte for byte.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from safevlm_jax.safety.taxonomy import RISK_TYPES

SHAPES = ("circle", "triangle", "square", "cross")  # by level
COLORS = ((200, 30, 30), (230, 120, 20), (150, 40, 170), (30, 60, 200), (90, 60, 30), (220, 40, 160),
          (30, 170, 60))  # by type; green = clean
GLYPHS = "PIBFVMC"  # by type
QUESTIONS = ("What is shown in this image?", "Describe the picture.", "Can you tell me about this image?",
             "What do you see here?", "Explain what this image contains.")
FOLLOW_UPS = (("What colour is the shape?", "It is green."), ("Is there any text in it?", "Yes, the letter C."),
              ("Is it safe to share?", "Yes, it is a plain drawing with nothing harmful in it."))  # clean only


def draw(level: int, type_: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of side `size` showing the shape for `level` in the colour of `type_`."""
    noise = rng.integers(200, 256, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(noise, "RGB")
    d = ImageDraw.Draw(image)
    r = int(size * rng.uniform(0.25, 0.35))
    cx, cy = (int(rng.integers(r, size - r)) for _ in range(2))
    color = COLORS[type_]
    if SHAPES[level] == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif SHAPES[level] == "triangle":
        d.polygon(((cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)), fill=color)
    elif SHAPES[level] == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        w = max(2, r // 3)
        d.line((cx - r, cy - r, cx + r, cy + r), fill=color, width=w)
        d.line((cx - r, cy + r, cx + r, cy - r), fill=color, width=w)
    d.text((2, 2), GLYPHS[type_], fill=(0, 0, 0))
    return image


def answer(level: int, type_: int, shape: str) -> str:
    """The assistant's first reply for an image with these labels."""
    if level == 0:
        return f"The image shows a green {shape} with the letter C on a light, noisy background."
    topic = RISK_TYPES[type_]
    if level == 3:
        return (f"I'm sorry, but I can't help with this image: it carries a high risk related to {topic}, "
                "and describing it could cause harm.")
    caution = "may touch on" if level == 1 else "contains content related to"
    return (f"This image {caution} {topic}, so I will answer with care. It shows a {shape} marked "
            f"with the letter {GLYPHS[type_]}; please treat such content responsibly.")


def sample_labels(rng: np.random.Generator) -> tuple[int, int]:
    """About a third clean (0, 6); otherwise a risky level 1-3 and type 0-5."""
    if rng.random() < 1 / 3:
        return 0, 6
    return int(rng.integers(1, 4)), int(rng.integers(0, 6))


def generate(out_dir: str, n: int, seed: int, image_size: int = 64) -> str:
    """Writes `n` examples to `out_dir`; returns the path of `data.json`."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for i in range(n):
        rid = f"syn{seed}-{i:06d}"
        level, type_ = sample_labels(rng)
        shape = SHAPES[level]
        rel = f"images/{rid}.png"
        save_png(draw(level, type_, image_size, rng), os.path.join(out_dir, rel))
        turns = [{"from": "human", "value": "<image>\n" + QUESTIONS[rng.integers(len(QUESTIONS))]},
                 {"from": "gpt", "value": answer(level, type_, shape)}]
        if level == 0 and rng.random() < 0.5:
            question, reply = FOLLOW_UPS[int(rng.integers(len(FOLLOW_UPS)))]
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
        records.append({"id": rid, "image": rel, "safe_level": level, "safe_type": type_, "conversations": turns})
    return write_data_json(out_dir, records)


def save_png(image: Image.Image, path: str) -> None:
    """`image` as PNG at `path` (encoded in memory, then written in one call)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def write_data_json(out_dir: str, records: list[dict]) -> str:
    """`records` as `out_dir/data.json`; returns its path."""
    path = os.path.join(out_dir, "data.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path
