"""Streaming text: generated token ids -> text deltas, for the CLI's stream and the engine."""

from __future__ import annotations


class Detokenizer:
    """Token ids -> text deltas, a few tokens decoded per step: each delta is decoded after
    the previous delta's tokens (a SentencePiece piece decodes differently at the start of a
    text) and held back while it ends inside a multi-byte character (vLLM's incremental
    detokenization)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]
