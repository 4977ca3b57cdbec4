"""Text with special tokens placed by the program, tokenized exactly as the tokenizer would
tokenize the whole string, without ever letting the text itself become a special token.

    specials = SpecialsTokenizer(tokenizer)
    ids, offsets = specials.encode(["... ASSISTANT: Sure", eos_id, "USER: ..."])

A tokenizer splits its input at added (special) tokens and tokenizes each stretch between them
on its own; what a stretch gets depends on where it sits: LLaMA's non-legacy tokenizer gives
the text right after `</s>` no word-start marker (`</s>` `USER`), its legacy layout gives one
(`</s>` `▁US` `ER`), and only the start of the string counts as the start. Tokenizing each
stretch in a separate call loses that. Writing `</s>` into the string and letting the tokenizer
find it would also find any `</s>` or `<image>` a user typed.

So this keeps a private tokenizer with the same normalizer, pre-tokenizer and model in which
the only added tokens are random sentinels, one per added token of the real one and with its
matching flags (lstrip, rstrip, single_word, normalized).
The caller's special ids go into the string as their sentinels; the tokenizer then splits and
tokenizes every stretch exactly as it does around the real token, and the sentinels' ids are
mapped back. User text meets no added token at all (as with `split_special_tokens=True`);
text containing a sentinel, or any text tokenizing to a special id, is an error.
"""

from __future__ import annotations

import bisect
import secrets
from typing import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer


class SpecialsTokenizer:
    """Args:
      tokenizer: an HF fast tokenizer (`backend_tokenizer`).
      forbidden: more ids plain text must never give (besides every added and special token
        but `<unk>`), e.g. an image token that is not an added token.
    """

    def __init__(self, tokenizer, forbidden: Iterable[int] = ()):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} must be a fast tokenizer")
        self.tokenizer = tokenizer
        real = tokenizer.backend_tokenizer
        added = real.get_added_tokens_decoder()  # {id: AddedToken}
        # The ids our placed specials stand for, and the ids plain text must never give.
        self.special_ids = set(added)
        self.forbidden_ids = ((self.special_ids | set(tokenizer.all_special_ids) | set(forbidden))
                              - {tokenizer.unk_token_id})
        # The same model, normalizer and pre-tokenizer (shared, not copied); no added tokens,
        # no post-processor (BOS), no truncation or padding.
        self._backend = Tokenizer(real.model)
        self._backend.normalizer, self._backend.pre_tokenizer = real.normalizer, real.pre_tokenizer
        model_ids = set(self._backend.get_vocab(with_added_tokens=False).values())
        self._sentinel, self._real = {}, {}
        for idx, t in added.items():
            sentinel = f"\ue000{secrets.token_hex(8)}\ue001"  # unguessable; checked absent anyway
            self._backend.add_special_tokens([AddedToken(
                sentinel, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                normalized=t.normalized, special=True)])
            sid = self._backend.token_to_id(sentinel)
            if sid in model_ids:
                raise ValueError(f"tokenizer {tokenizer.name_or_path!r}: no free id for a placeholder "
                                 f"of {t.content!r}")
            self._sentinel[idx], self._real[sid] = sentinel, idx

    def encode(self, parts: Sequence[str | int]) -> tuple[list[int], list[tuple[int, int] | None]]:
        """parts: plain text (str) and special token ids (int, any added token of the tokenizer),
        in order -> (ids, offsets): each id's character span in the concatenated text parts,
        None for the specials placed by `parts` (they come out in order, one id each).
        The string starts here: no BOS or other post-processing is added."""
        pieces, starts = [], []  # starts: (string position, text position) of each text part
        string_len = text_len = 0
        for part in parts:
            if isinstance(part, str):
                if any(s in part for s in self._sentinel.values()):
                    raise ValueError("text contains a reserved placeholder string")
                starts.append((string_len, text_len))
                text_len += len(part)
                piece = part
            elif part in self._sentinel:
                piece = self._sentinel[part]
            else:
                raise ValueError(f"id {part} is not a special token of {self.tokenizer.name_or_path!r}")
            pieces.append(piece)
            string_len += len(piece)
        enc = self._backend.encode("".join(pieces), add_special_tokens=False)
        ids, offsets = [], []
        for tok, (s, e) in zip(enc.ids, enc.offsets):
            if tok in self._real:
                ids.append(self._real[tok])
                offsets.append(None)
                continue
            if tok in self.forbidden_ids:
                raise ValueError(f"tokenizer {self.tokenizer.name_or_path!r} turned plain text into the special "
                                 f"id {tok} (is the token registered as special?): "
                                 f"{''.join(p for p in parts if isinstance(p, str))!r}")
            ids.append(tok)
            offsets.append((_to_text(s, starts), _to_text(e, starts)))
        return ids, offsets


def _to_text(pos: int, starts: list[tuple[int, int]]) -> int:
    """A position in the joined string (text + sentinels) -> the same place in the text alone
    (a text token lies inside one text part: the last one starting at or before `pos`)."""
    string_start, text_start = starts[bisect.bisect_right(starts, (pos, float("inf"))) - 1]
    return text_start + pos - string_start
