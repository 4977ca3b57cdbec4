"""Why a SafeVLM record is refused: one reason code per kind of bad record.

The builder counts skipped records by these codes in `report.json`; with `--strict` the first
one stops the build. Codes are stable strings so reports can be compared across builds.
"""

from __future__ import annotations

REASONS = {
    "not_an_object": "the record is not a JSON object",
    "non_utf8_text": "a string in the record is not valid UTF-8",
    "bad_id": "`id` is missing, empty, or not a string/integer",
    "duplicate_id": "`id` was already used by an earlier record",
    "bad_image_field": "`image` is missing or not a non-empty string",
    "absolute_image_path": "`image` is an absolute path",
    "image_path_escapes_root": "`image` climbs out of the image root with '..'",
    "image_symlink_escapes_root": "`image` resolves (through a symlink) outside the image root",
    "missing_image": "the image file does not exist or is not a regular file",
    "corrupt_image": "the image file cannot be decoded (corrupt or truncated)",
    "unsupported_image_format": "the image is not PNG, JPEG, WebP, GIF, BMP or TIFF (recognised by content)",
    "image_too_large": "the image has more pixels than the configured limit",
    "aspect_ratio_too_large": "one side of the image is more than `data.images.MAX_ASPECT` times the other",
    "safe_level_wrong_type": "`safe_level` is missing or not an integer",
    "safe_level_out_of_range": "`safe_level` is outside 0..num_levels-1",
    "safe_type_wrong_type": "`safe_type` is missing or not an integer",
    "safe_type_out_of_range": "`safe_type` is outside 0..num_types-1",
    "empty_conversation": "`conversations` is missing, not a list, or empty",
    "bad_turn": "a turn is not {'from': 'human'|'gpt', 'value': non-empty string}",
    "no_assistant_turn": "the conversation has no 'gpt' turn",
    "bad_turn_order": "turns do not alternate human/gpt starting with human and ending with gpt",
    "missing_image_token": "no turn contains '<image>'",
    "multiple_image_tokens": "'<image>' occurs more than once",
    "image_token_not_in_first_turn": "'<image>' is not in the first human turn",
}


class BadRecord(ValueError):
    """A record that must not enter the dataset.

    Attributes:
      reason: a key of `REASONS`.
      record: the record's `id` when known, else `#<index>` in the JSON list.
    """

    def __init__(self, reason: str, detail: str, record: str | None = None):
        if reason not in REASONS:
            raise KeyError(f"unknown BadRecord reason {reason!r}; known: {sorted(REASONS)}")
        self.reason = reason
        self.detail = detail
        self.record = record
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"record {self.record}: " if self.record else ""
        return f"{where}{self.reason}: {self.detail}"

    def for_record(self, record: str) -> "BadRecord":
        """The same error, naming `record` (e.g. when raised by image code that knows no ids)."""
        return BadRecord(self.reason, self.detail, record)

    def to_json(self) -> dict[str, str]:
        """As `report.json` lists a skipped record: {"record", "reason", "detail"}."""
        return {"record": self.record or "", "reason": self.reason, "detail": self.detail}
