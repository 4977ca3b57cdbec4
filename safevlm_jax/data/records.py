"""SafeVLM JSON records (docs/architecture.md, "Data"): load the file, validate each record,
normalise its turns.

A record looks like
  {"id": "000123", "image": "relative/path.jpg", "safe_level": 2, "safe_type": 1,
   "conversations": [{"from": "human", "value": "<image>\\nWhat is shown here?"},
                     {"from": "gpt", "value": "..."}]}
`parse_record` turns one into a `Record` or raises `BadRecord` with a reason code
(`errors.REASONS`). The `<image>` marker is the data format's placeholder: it is removed from
the text here (LLaVA's `preprocess_multimodal` moves it to the start of its turn), and the
template inserts the image positions itself, so text never carries image tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

from safevlm_jax.config import SafetyConfig
from safevlm_jax.data.errors import BadRecord
from safevlm_jax.data.images import DEFAULT_MAX_PIXELS, read_image_file

IMAGE_MARKER = "<image>"
HUMAN, GPT = "human", "gpt"


@dataclasses.dataclass(frozen=True)
class Turn:
    """One message; `role` is "human" or "gpt" (LLaVA's `from` values), `value` plain text."""

    role: str
    value: str


@dataclasses.dataclass(frozen=True)
class Record:
    """A validated record. `turns` alternate human/gpt; the image belongs to `turns[0]`."""

    id: str
    image: str
    safe_level: int
    safe_type: int
    turns: tuple[Turn, ...]

    def turns_json(self) -> str:
        """The turns as stored in the dataset: a JSON list of {"from", "value"}."""
        return json.dumps([{"from": t.role, "value": t.value} for t in self.turns], ensure_ascii=False)


def load_json(path: str | os.PathLike) -> list[Any]:
    """Reads a SafeVLM JSON file (a list of records).

    Invalid UTF-8 bytes do not fail the whole file: they are kept as lone surrogates
    (`surrogateescape`) so that only the records containing them are refused (`non_utf8_text`).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def turns_from_json(text: str) -> tuple[Turn, ...]:
    """Inverse of `Record.turns_json`."""
    return tuple(Turn(t["from"], t["value"]) for t in json.loads(text))


def parse_record(obj: Any, index: int, num_levels: int = SafetyConfig.num_levels,
                 num_types: int = SafetyConfig.num_types) -> Record:
    """Validates one JSON object (`index`: its position in the file, for error messages).

    Raises:
      BadRecord: with the first problem found, naming the record and the field.
    """
    name = f"#{index}"
    if not isinstance(obj, dict):
        raise BadRecord("not_an_object", f"got {type(obj).__name__}", name)
    rid = obj.get("id")
    if isinstance(rid, str) and _is_utf8(rid) and rid:
        name = rid
    elif isinstance(rid, int) and not isinstance(rid, bool):
        name = rid = str(rid)
    for field, text in _strings(obj):
        if not _is_utf8(text):
            raise BadRecord("non_utf8_text", f"field {field} holds bytes that are not UTF-8", name)
    if not isinstance(rid, str) or not rid:
        raise BadRecord("bad_id", f"field 'id' must be a non-empty string or integer, got {rid!r}", name)
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise BadRecord("bad_image_field", f"field 'image' must be a non-empty string, got {image!r}", name)
    level = _label(obj, "safe_level", num_levels, name)
    type_ = _label(obj, "safe_type", num_types, name)
    return Record(rid, image, level, type_, _turns(obj.get("conversations"), name))


def check_records(raw: list[Any], image_root: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
                  num_levels: int = SafetyConfig.num_levels, num_types: int = SafetyConfig.num_types
                  ) -> Iterator[tuple[Record, bytes] | tuple[BadRecord, None]]:
    """Each object of a loaded JSON list, checked as the dataset build checks it: `parse_record`,
    a unique id, an image file that reads and decodes under `image_root`. Yields (record, its
    image bytes) or (BadRecord naming the record and why it is refused, None), in order."""
    seen = set()
    for i, obj in enumerate(raw):
        try:
            record = parse_record(obj, i, num_levels, num_types)
            if record.id in seen:
                raise BadRecord("duplicate_id", f"id {record.id!r} already used by an earlier record", record.id)
            seen.add(record.id)
            try:
                data = read_image_file(image_root, record.image, max_pixels)
            except BadRecord as e:
                raise e.for_record(record.id) from e
        except BadRecord as e:
            yield e, None
            continue
        yield record, data


def _label(obj: dict, field: str, num_classes: int, name: str) -> int:
    value = obj.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRecord(f"{field}_wrong_type", f"field {field!r} must be an integer, got {value!r}", name)
    if not 0 <= value < num_classes:
        raise BadRecord(f"{field}_out_of_range",
                        f"field {field!r} must be in 0..{num_classes - 1}, got {value}", name)
    return value


def _turns(conv: Any, name: str) -> tuple[Turn, ...]:
    if not isinstance(conv, list) or not conv:
        raise BadRecord("empty_conversation", f"field 'conversations' must be a non-empty list, got {conv!r}", name)
    turns = []
    for i, t in enumerate(conv):
        ok = (isinstance(t, dict) and t.get("from") in (HUMAN, GPT)
              and isinstance(t.get("value"), str) and t["value"].strip())
        if not ok:
            raise BadRecord("bad_turn", f"conversations[{i}] = {t!r}", name)
        turns.append(Turn(t["from"], t["value"]))
    if not any(t.role == GPT for t in turns):
        raise BadRecord("no_assistant_turn", "no turn has 'from': 'gpt'", name)
    roles = [t.role for t in turns]
    if len(roles) % 2 or any(r != (HUMAN, GPT)[i % 2] for i, r in enumerate(roles)):
        raise BadRecord("bad_turn_order", f"roles {roles}", name)
    counts = [t.value.count(IMAGE_MARKER) for t in turns]
    if sum(counts) == 0:
        raise BadRecord("missing_image_token", f"no turn contains {IMAGE_MARKER!r}", name)
    if sum(counts) > 1:
        raise BadRecord("multiple_image_tokens", f"{IMAGE_MARKER!r} occurs {sum(counts)} times", name)
    if counts[0] != 1:
        raise BadRecord("image_token_not_in_first_turn",
                        f"{IMAGE_MARKER!r} is in conversations[{counts.index(1)}]", name)
    question = turns[0].value.replace(IMAGE_MARKER, "").strip()
    if not question:
        raise BadRecord("bad_turn", "conversations[0] holds only the image", name)
    return (Turn(HUMAN, question), *turns[1:])


def _strings(obj: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string (keys included) inside a JSON value, with its location."""
    if isinstance(obj, str):
        yield path or "<root>", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k, f"{path}.{k!r}[key]")
            yield from _strings(v, f"{path}[{k!r}]")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _strings(v, f"{path}[{i}]")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
