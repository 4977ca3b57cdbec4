"""Conversation templates and tokenization with labels (SPEC §1, LLaVA "v1" / Vicuna).

v1 training text for a two-round conversation (`[IMG]` = `num_image_tokens` image ids,
`</s>` = the eos id):

  <s>{system} USER: [IMG]\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

"psa" (the authors' inference variant, SPEC §2) puts the image first:
  <s>[IMG]\\n{system} USER: {q1} ASSISTANT: {a1}</s>...

Special tokens (bos, image, eos) are only ever inserted here, as ids. The text between them is
tokenized with `split_special_tokens=True`, so "<image>" or "</s>" typed by a user stays plain
text. Each stretch of text between two special tokens is tokenized in one call, exactly as the
tokenizer would tokenize the whole prompt string; labels come from character offsets: a token
is supervised when it overlaps an assistant answer, and so is the `</s>` closing it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from safevlm_jax.data.records import GPT, HUMAN, Turn
from safevlm_jax.data.tokenizer import IMAGE, image_token_id

IGNORE_INDEX = -100
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_IMAGE = object()  # marks the image span among the pieces of a prompt
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
    """LLaVA `Conversation` with `SeparatorStyle.TWO`; sep2 is the tokenizer's eos token.

    image_position: "first_user_turn" (v1: `USER: [IMG]\\n{q}`) or "prompt_start" (psa).
    """

    name: str
    system: str = VICUNA_SYSTEM
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    image_position: str = "first_user_turn"


TEMPLATES = {
    "v1": ConversationTemplate("v1"),
    "psa": ConversationTemplate("psa", image_position="prompt_start"),
}


def get_template(name: str) -> ConversationTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


@dataclasses.dataclass
class _Chunk:
    """Text between two special tokens, with the character spans of assistant answers."""

    text: str = ""
    answers: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    def add(self, text: str, answer: bool = False):
        if answer:
            self.answers.append((len(self.text), len(self.text) + len(text)))
        self.text += text


class TextEncoder:
    """Turns conversations into `input_ids` and `labels` for one tokenizer and template.

    Args:
      tokenizer: any HF fast tokenizer (offsets are needed) with an eos token and `image_token`.
      num_image_tokens: positions per image (`ModelConfig.num_image_tokens`: 64 + 576).
      max_len: longest sequence; longer ones are cut at the end (never inside the image span,
        which `__init__` checks is always possible) and counted in `num_truncated`.
      template: a `ConversationTemplate` or its name in `TEMPLATES`.
    """

    def __init__(self, tokenizer, num_image_tokens: int, max_len: int,
                 template: ConversationTemplate | str = "v1", image_token: str = IMAGE):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} must be a fast tokenizer (offsets needed)")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token (the v1 sep2)")
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.num_image_tokens = num_image_tokens
        self.max_len = max_len
        self.image_token_id = image_token_id(tokenizer, image_token)
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
        # Ids user text must never produce: every special/added token except <unk>.
        added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self.forbidden_ids = (set(tokenizer.all_special_ids) | added | {self.image_token_id}) - {tokenizer.unk_token_id}
        self.num_truncated = 0
        probe, _ = self._encode_full([Turn(HUMAN, "?"), Turn(GPT, "?")], image=True, generation=False)
        self.image_end = int(np.flatnonzero(probe == self.image_token_id)[-1]) + 1
        if max_len <= self.image_end:
            raise ValueError(f"max_len={max_len} leaves no room after the image: the image span ends at "
                             f"position {self.image_end} with template {self.template.name!r}")

    def encode(self, turns: Sequence[Turn], image: bool = True, example_id: str = "") -> tuple[np.ndarray, np.ndarray]:
        """A training conversation -> (input_ids [T], labels [T]), int32, T <= max_len.

        `turns` alternate human/gpt starting with human (as `records.parse_record` returns);
        their text is plain text. With `image`, the image positions go where the template
        says. `example_id` only names the example in the truncation warning.
        """
        _check_roles(turns, generation=False)
        ids, labels = self._encode_full(turns, image, generation=False)
        if len(ids) > self.max_len:
            self.num_truncated += 1
            _log.warning("truncated example %r from %d to max_len=%d tokens (%d truncated so far)",
                         example_id, len(ids), self.max_len, self.num_truncated)
            ids, labels = ids[:self.max_len], labels[:self.max_len]
        return ids, labels

    def encode_prompt(self, turns: Sequence[Turn], image: bool = True) -> np.ndarray:
        """A prompt for generation (turns end with a human turn) -> input_ids [T] int32,
        ending with "ASSISTANT:" as LLaVA's `conv.get_prompt()` does. Not truncated."""
        _check_roles(turns, generation=True)
        return self._encode_full(turns, image, generation=True)[0]

    # ------------------------------------------------------------------------------------
    def _encode_full(self, turns, image: bool, generation: bool) -> tuple[np.ndarray, np.ndarray]:
        t = self.template
        pieces: list = []  # _Chunk, eos id, or _IMAGE
        chunk = _Chunk()
        if image and t.image_position == "prompt_start":
            pieces, chunk = [_IMAGE], _Chunk("\n")
        chunk.add(t.system + t.sep)
        for i, turn in enumerate(turns):
            if turn.role == HUMAN:
                chunk.add(t.roles[0] + ": ")
                if image and i == 0 and t.image_position == "first_user_turn":
                    pieces += [chunk, _IMAGE]
                    chunk = _Chunk("\n")
                chunk.add(turn.value + t.sep)
            else:
                # The space after "ASSISTANT:" belongs to the answer, as in LLaVA's masking
                # (and the generation prompt ends at the colon).
                chunk.add(t.roles[1] + ":")
                chunk.add(" " + turn.value, answer=True)
                pieces += [chunk, self.eos_token_id]
                chunk = _Chunk()
        if generation:
            chunk.add(t.roles[1] + ":")
        pieces.append(chunk)

        ids, labels = [list(self.bos_ids)], [[IGNORE_INDEX] * len(self.bos_ids)]
        for piece in pieces:
            if piece is _IMAGE:
                ids.append([self.image_token_id] * self.num_image_tokens)
                labels.append([IGNORE_INDEX] * self.num_image_tokens)
            elif isinstance(piece, int):  # eos closing an answer: supervised
                ids.append([piece])
                labels.append([piece])
            elif piece.text:
                piece_ids, piece_labels = self._tokenize(piece)
                ids.append(piece_ids)
                labels.append(piece_labels)
        return (np.concatenate(ids).astype(np.int32), np.concatenate(labels).astype(np.int32))

    def _tokenize(self, chunk: _Chunk) -> tuple[list[int], list[int]]:
        enc = self.tokenizer(chunk.text, add_special_tokens=False, split_special_tokens=True,
                             return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        bad = self.forbidden_ids.intersection(ids)
        if bad:
            raise ValueError(f"tokenizer {self.tokenizer.name_or_path!r} turned plain text into special ids "
                             f"{sorted(bad)} (is the token registered as special?): {chunk.text!r}")
        labels = [tok if any(s < end and e > start for start, end in chunk.answers) else IGNORE_INDEX
                  for tok, (s, e) in zip(ids, enc["offset_mapping"])]
        return ids, labels


def _check_roles(turns: Sequence[Turn], generation: bool) -> None:
    roles = [t.role for t in turns]
    want = [(HUMAN, GPT)[i % 2] for i in range(len(roles))]
    last = HUMAN if generation else GPT
    if not roles or roles != want or roles[-1] != last:
        raise ValueError(f"turns must alternate human/gpt from human and end with {last!r}, got {roles}")
