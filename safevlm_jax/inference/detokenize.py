"""Generated token ids -> text: the whole answer (`decode`) or deltas as they come (`Detokenizer`).

An answer is decoded as SentencePiece decodes a text: the word-start space of its first piece
is dropped (LLaMA's tokenizer does that itself; a byte-level BPE tokenizer such as the demo's
keeps it, so every answer would start with " "). The ids stay as the model produced them.
"""

from __future__ import annotations


def keeps_leading_space(tokenizer) -> bool:
    """Whether decoding a word-start piece alone keeps its space (byte-level BPE: "Ġb" -> " b";
    SentencePiece: "▁b" -> "b")."""
    ids = tokenizer("a b", add_special_tokens=False)["input_ids"]
    return len(ids) > 1 and tokenizer.decode(ids[-1:]).startswith(" ")


def decode(tokenizer, ids: list[int]) -> str:
    """An answer's ids -> its text (special tokens skipped, no leading word-start space)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text[1:] if text.startswith(" ") and keeps_leading_space(tokenizer) else text


class Detokenizer:
    """Token ids -> text deltas that add up to `decode(ids)`, a few tokens decoded per step:
    each delta is decoded after the previous delta's tokens (a SentencePiece piece decodes
    differently at the start of a text) and held back while it ends inside a multi-byte
    character (vLLM's incremental detokenization)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0
        self.strip_space = keeps_leading_space(tokenizer)  # until the first text

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
        delta = text[len(before):]
        if self.strip_space:
            self.strip_space = False
            delta = delta[1:] if delta.startswith(" ") else delta
        return delta
