"""Evaluation inputs: labelled images (SafeVLM JSON, docs/architecture.md) and RTVLM-style
questions.

Labelled data is a JSON file of records, or a directory holding `data.json` (what
`safevlm_jax.data.synthetic` writes); only `id`, `image`, `safe_level` and `safe_type` are
read, so records need no conversation. Questions are JSONL, one
`{"id", "image", "question", "category"}` per line. Image paths are relative to the file's
directory unless an image root is given, and must stay inside it.

A bad record (missing or corrupt image, label of the wrong type or out of range, duplicate
id, ...) is skipped and returned as a `Skipped` with the data builder's reason code
(`safevlm_jax.data.errors.REASONS`, plus `bad_question_field`/`bad_category_field`/`bad_json`
here); with `strict` the first one raises. A file with no usable record raises a ValueError
naming the file and the reasons.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
from typing import Any, Iterator, Sequence, TypeVar

import numpy as np
from absl import flags

from safevlm_jax.data.errors import BadRecord
from safevlm_jax.data.images import ImageConfig, load_pixel_values, read_image_file
from safevlm_jax.data.records import load_json

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Example:
    """A labelled image: `path` is the resolved image file."""

    id: str
    path: str
    level: int
    type: int


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    path: str  # resolved image file
    image: str  # as written in the file
    question: str
    category: str


class BadInput(ValueError):
    """A question line the data builder has no reason code for (bad_json, bad_*_field)."""

    def __init__(self, reason: str, detail: str, record: str):
        self.reason, self.detail, self.record = reason, detail, record
        super().__init__(f"record {record}: {reason}: {detail}")


@dataclasses.dataclass(frozen=True)
class Skipped:
    record: str  # the record's id, or "#index" / "line N"
    reason: str
    detail: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def resolve_json(data: str) -> str:
    """A JSON file, or a directory with `data.json` -> the JSON file's path."""
    path = os.path.join(data, "data.json") if os.path.isdir(data) else data
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{data}: no such file" if not os.path.isdir(data)
                                else f"{data}: directory has no data.json")
    return path


def _image(obj: dict, name: str, root: str, max_pixels: int) -> str:
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise BadRecord("bad_image_field", f"field 'image' must be a non-empty string, got {image!r}", name)
    try:
        read_image_file(root, image, max_pixels)
    except BadRecord as e:
        raise e.for_record(name) from e
    return os.path.realpath(os.path.join(root, image))


def _label(obj: dict, field: str, num: int, name: str) -> int:
    value = obj.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRecord(f"{field}_wrong_type", f"field {field!r} must be an integer, got {value!r}", name)
    if not 0 <= value < num:
        raise BadRecord(f"{field}_out_of_range", f"field {field!r} must be in 0..{num - 1}, got {value}", name)
    return value


def _id(obj: Any, name: str, seen: set[str]) -> str:
    if not isinstance(obj, dict):
        raise BadRecord("not_an_object", f"got {type(obj).__name__}", name)
    rid = obj.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid:
        raise BadRecord("bad_id", f"field 'id' must be a non-empty string or integer, got {rid!r}", name)
    if rid in seen:
        raise BadRecord("duplicate_id", f"id {rid!r} was used by an earlier record", rid)
    seen.add(rid)
    return rid


def _collect(path: str, items: Sequence[tuple[str, Any]], parse, strict: bool) -> tuple[list, list[Skipped]]:
    good, skipped, seen = [], [], set()
    for name, obj in items:
        try:
            good.append(parse(obj, name, seen))
        except (BadRecord, BadInput) as e:
            if strict:
                raise ValueError(f"{path}: {e}") from e
            skipped.append(Skipped(e.record or name, e.reason, e.detail))
    if not good:
        counts = dict(collections.Counter(s.reason for s in skipped))
        raise ValueError(f"{path}: no usable records ({len(items)} in the file; skipped by reason: {counts})")
    return good, skipped


def load_labelled(data: str, image_root: str | None = None, *, num_levels: int = 4, num_types: int = 7,
                  max_pixels: int = ImageConfig.max_pixels, strict: bool = False
                  ) -> tuple[list[Example], list[Skipped]]:
    """Reads labelled images; returns (usable examples, skipped records)."""
    path = resolve_json(data)
    root = image_root or os.path.dirname(os.path.abspath(path))

    def parse(obj, name, seen):
        rid = _id(obj, name, seen)
        return Example(rid, _image(obj, rid, root, max_pixels), _label(obj, "safe_level", num_levels, rid),
                       _label(obj, "safe_type", num_types, rid))

    return _collect(path, [(f"#{i}", obj) for i, obj in enumerate(load_json(path))], parse, strict)


def load_questions(path: str, image_root: str | None = None, *, max_pixels: int = ImageConfig.max_pixels,
                   strict: bool = False) -> tuple[list[Question], list[Skipped]]:
    """Reads RTVLM-style JSONL questions; returns (usable questions, skipped lines)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    root = image_root or os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                items.append((f"line {n}", line))

    def parse(line, name, seen):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput("bad_json", f"not a JSON object ({e})", name) from e
        rid = _id(obj, name, seen)
        text = {k: obj.get(k) for k in ("question", "category")}
        for key, value in text.items():
            if not isinstance(value, str) or not value.strip():
                raise BadInput(f"bad_{key}_field", f"field {key!r} must be a non-empty string, got {value!r}", rid)
        return Question(rid, _image(obj, rid, root, max_pixels), obj["image"], text["question"], text["category"])

    return _collect(path, items, parse, strict)


def load_pixels(paths: Sequence[str], config: ImageConfig) -> np.ndarray:
    """Image files (already checked) -> pixel_values [len(paths), S, S, 3] float32."""
    out = []
    for p in paths:
        with open(p, "rb") as f:
            out.append(load_pixel_values(f.read(), config))
    return np.stack(out)


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield items[i:i + size]


def warn_skipped(skipped: Sequence[Skipped], what: str) -> None:
    """One stderr line per reason (with the first few records), so nothing is dropped silently."""
    by_reason = collections.defaultdict(list)
    for s in skipped:
        by_reason[s.reason].append(s)
    for reason, items in sorted(by_reason.items()):
        first = "; ".join(f"{s.record}: {s.detail}" for s in items[:3])
        print(f"warning: skipped {len(items)} {what} ({reason}): {first}{' ...' if len(items) > 3 else ''}",
              file=sys.stderr)


def resolve_checkpoint(checkpoint: str | None) -> str:
    """`checkpoint` if it is one; without it the demo checkpoint, else a tiny random one
    (announced on stderr), as `safevlm_jax.sample` does."""
    if checkpoint is None:
        from safevlm_jax.checkpoint.demo import resolve_checkpoint as default_checkpoint

        return default_checkpoint(None)
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise FileNotFoundError(f"{checkpoint}: not a checkpoint directory (no config.json)")
    return checkpoint


def define_labelled_data_flags(flag_values) -> None:
    """Defines on `flag_values` (an absl FlagValues) the flags shared by the commands that read
    a labelled dataset with a checkpoint (`eval.head`, `eval.tsne`)."""
    flags.DEFINE_string("checkpoint", None, "checkpoint directory (default: the demo, else a tiny random one)",
                        flag_values=flag_values)
    flags.DEFINE_string("data", None, "SafeVLM JSON file, or a directory with data.json", required=True,
                        flag_values=flag_values)
    flags.DEFINE_string("image_root", None, "image paths are relative to this (default: the JSON's directory)",
                        flag_values=flag_values)
    flags.DEFINE_string("out", None, "output directory", required=True, flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 32, "images per batch", flag_values=flag_values)
    flags.DEFINE_bool("strict", False, "stop at the first bad record instead of skipping it",
                      flag_values=flag_values)
    flags.DEFINE_bool("no_progress", False, "no tqdm bar", flag_values=flag_values)
