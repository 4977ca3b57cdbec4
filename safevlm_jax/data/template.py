"""Conversation templates and tokenization with labels, as LLaVA-1.5's own code gives them.

v1 (LLaVA's `conv_vicuna_v1`, docs/prompt_formats.md) for a two-round conversation, `[IMG]` = the
image positions and `</s>` = the tokenizer's eos:

  <s>{system} USER: [IMG]\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

A generation prompt (`encode_prompt`) may carry its one image in a later user turn: there the
image slot goes right before the question (`USER: [IMG]\\n{q2} ASSISTANT:`), as LLaVA's
`preprocess_multimodal` moves `<image>\\n` to the front of the message that holds it; and its
safety hint goes after the last question (the hinted turn's text after `{question}` ends that
turn: `USER: {q2} {hint} ASSISTANT:`).

psa (the PSA-VLM authors' inference strings, docs/prompt_formats.md):
`<s>[IMG]\\n USER: {q} \\nASSISTANT:` and, with a hint,
`<s>[IMG]\\n \\n USER: {q}  \\n Safe Hint: {hint} \\n ASSISTANT:  `.

Token ids (`prompt_format`):
  "llava": LLaVA's `tokenizer_image_token`/`preprocess_v1`: the text is split at the image and
           each side tokenized as one string (the second without BOS), so a SentencePiece
           tokenizer starts the text after the image with a word-start piece (`▁` `<0x0A>`).
  "hf":    HF's `LlavaProcessor`: one string with the image positions as special tokens in it
           (`<0x0A>` alone after the image with a non-legacy tokenizer).
Inside a side, each `</s>` is placed as an id and the text after it tokenized as the tokenizer
does right after `</s>` (`specials.SpecialsTokenizer`): `</s>` `USER` with LLaMA's non-legacy
layout, `</s>` `▁US` `ER` with the legacy one. Text (system, questions, answers, hints) is
always plain text: a typed `<image>` or `</s>` stays ordinary tokens.

Labels: a token is supervised when it overlaps an assistant answer (with the space after
"ASSISTANT:", which the answer's first token holds: `▁Sure`), and so is the `</s>` closing it.
LLaVA's `preprocess_v1` counts tokens instead: the instruction is `len(ids("... ASSISTANT: "))
- 2` (assuming a BOS and a lone `▁` at its end), and `tokenizer.legacy` must say truly whether
`</s>USER` loses a token; a question or answer holding "</s>" or " ASSISTANT: " breaks its
round split, and any miscount makes it mask the whole example. We keep the overlap rule, which
supervises exactly the answers whatever the tokenizer and needs no `legacy` flag (transformers 5
saves none). The two agree for ordinary conversations and for the odd whitespace tried (answers
starting with newlines or spaces, questions and answers ending with them) with LLaMA's
tokenizer in each layout and with byte-level BPE (tests/test_data_template.py).
"""

from __future__ import annotations

import dataclasses
import logging
import string
from typing import Any, Mapping, Sequence

import numpy as np

from safevlm_jax.data.records import GPT, HUMAN, Turn
from safevlm_jax.data.specials import SpecialsTokenizer
from safevlm_jax.data.tokenizer import IMAGE, image_token_id

IGNORE_INDEX = -100
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_SLOT = "<image>\n"  # where a turn format puts the image (LLaVA adds the "\n" with it)
PROMPT_FORMATS = ("llava", "hf")
# fields each turn format must use, and may use ({system} is optional: psa has none)
_FIELDS = {"first_turn": ({"question"}, {"system"}), "next_turn": ({"question"}, set()),
           "hinted_turn": ({"question", "hint"}, {"system"})}
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
    """How a conversation becomes text; each turn format runs up to the assistant's colon.

    first_turn:  the first user turn, with `{system}`, `{question}` and the image slot
                 "<image>\\n" (left out, "\\n" included, for a conversation without image);
    next_turn:   each later user turn (after the previous answer's eos), with `{question}`;
    hinted_turn: a one-question generation prompt with a safety hint `{hint}` (the hint
                 config's prefix and text, e.g. "Safe Hint: ...").
    An answer follows its turn as " {answer}" and the tokenizer's eos (LLaVA's sep2).
    Serialisable (`to_dict`/`from_dict`): a checkpoint records the one it was trained with.
    """

    name: str
    system: str
    first_turn: str
    next_turn: str
    hinted_turn: str

    def __post_init__(self):
        for field, (need, optional) in _FIELDS.items():
            fmt = getattr(self, field)
            got = [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]
            if not need <= set(got) <= need | optional or len(got) != len(set(got)):
                raise ValueError(f"template {self.name!r}: {field} must use each of {sorted(need)} once "
                                 f"(and may use {sorted(optional)}), got {got}")
            want_image = field != "next_turn"
            if fmt.count(IMAGE_SLOT) != want_image or fmt.count("<image>") != want_image:
                raise ValueError(f"template {self.name!r}: {field} must hold {IMAGE_SLOT!r} "
                                 f"{'once' if want_image else 'never'}: {fmt!r}")

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ConversationTemplate":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, Mapping) or set(d) != names or not all(isinstance(v, str) for v in d.values()):
            raise ValueError(f"a conversation template needs exactly the string fields {sorted(names)}, got {d!r}")
        return cls(**d)


TEMPLATES = {
    "v1": ConversationTemplate(
        "v1", VICUNA_SYSTEM, first_turn="{system} USER: <image>\n{question} ASSISTANT:",
        next_turn="USER: {question} ASSISTANT:",
        hinted_turn="{system} USER: <image>\n{question} {hint} ASSISTANT:"),
    "psa": ConversationTemplate(  # no system text; their spaces and newlines as written
        "psa", "", first_turn="<image>\n USER: {question} \nASSISTANT:",
        next_turn="USER: {question} \nASSISTANT:",
        hinted_turn="<image>\n \n USER: {question}  \n {hint} \n ASSISTANT:  "),
}
ALIASES = {"llava_v1": "v1"}


def get_template(template: ConversationTemplate | str) -> ConversationTemplate:
    """A template, or its name in `TEMPLATES` ("llava_v1" = "v1")."""
    if isinstance(template, ConversationTemplate):
        return template
    name = ALIASES.get(template, template)
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; known: {sorted(TEMPLATES) + sorted(ALIASES)}")
    return TEMPLATES[name]


_IMAGE = object()  # the image span among a conversation's parts


class TextEncoder:
    """Turns conversations into `input_ids` and `labels` for one tokenizer and template.

    Args:
      tokenizer: any HF fast tokenizer with an eos token and `image_token`.
      num_image_tokens: positions per image (`ModelConfig.num_image_tokens`: 64 + 576).
      max_len: longest sequence; longer ones are cut at the end (never inside the image span,
        which `__init__` checks is always possible) and counted in `num_truncated`.
      template: a `ConversationTemplate` or its name.
      prompt_format: "llava" or "hf" (module docstring).
    """

    def __init__(self, tokenizer, num_image_tokens: int, max_len: int,
                 template: ConversationTemplate | str = "v1", image_token: str = IMAGE,
                 prompt_format: str = "llava"):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token (the v1 sep2)")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        self.tokenizer, self.template = tokenizer, get_template(template)
        self.num_image_tokens, self.max_len, self.prompt_format = num_image_tokens, max_len, prompt_format
        self.image_token_id = image_token_id(tokenizer, image_token)
        self.specials = SpecialsTokenizer(tokenizer, forbidden={self.image_token_id})
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
        self.num_truncated = 0
        probe, _ = self._encode([Turn(HUMAN, "?"), Turn(GPT, "?")], image=True)
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
        ids, labels = self._encode(turns, image)
        if len(ids) > self.max_len:
            self.num_truncated += 1
            _log.warning("truncated example %r from %d to max_len=%d tokens (%d truncated so far)",
                         example_id, len(ids), self.max_len, self.num_truncated)
            ids, labels = ids[:self.max_len], labels[:self.max_len]
        return ids, labels

    def encode_prompt(self, turns: Sequence[Turn], image: bool = True, hint: str | None = None,
                      system: str | None = None, image_turn: int = 0) -> np.ndarray:
        """A prompt for generation (turns end with a human turn) -> input_ids [T] int32, ending
        as the template's turn does ("ASSISTANT:", LLaVA's `conv.get_prompt()`). `hint`: the
        safety hint text, after the last question; `system`: the system text instead of the
        template's (which must have a place for it); `image_turn`: the index in `turns` of
        the user turn holding the image (with `image`). Not truncated."""
        _check_roles(turns, generation=True)
        if image and not (0 <= image_turn < len(turns) and turns[image_turn].role == HUMAN):
            raise ValueError(f"image_turn {image_turn} is not a user turn of {len(turns)} turns")
        hinted = self.template.hinted_turn if hint is not None and len(turns) == 1 else self.template.first_turn
        if system is not None and "{system}" not in hinted:
            raise ValueError(f"template {self.template.name!r} has no system text to replace")
        return self._encode(turns, image, hint, system, image_turn)[0]

    # ------------------------------------------------------------------------------------
    def _turn_format(self, i: int, last: bool, hint: str | None, image: bool) -> str:
        """The format of user turn `i` (`last`: the question to answer), its image slot kept
        only where the image is."""
        t = self.template
        if i == 0:
            fmt = t.hinted_turn if hint is not None and last else t.first_turn
        else:
            fmt = t.next_turn
            if hint is not None and last:  # the hinted turn's ending after the question
                fmt = fmt.partition("{question}")[0] + "{question}" + t.hinted_turn.partition("{question}")[2]
            fmt = fmt.replace("{question}", IMAGE_SLOT + "{question}", 1)
        return fmt if image else fmt.replace(IMAGE_SLOT, "")

    def _encode(self, turns, image: bool, hint: str | None = None, system: str | None = None,
                image_turn: int = 0) -> tuple[np.ndarray, np.ndarray]:
        t = self.template
        parts: list = []  # (str, is_answer), (eos id, supervised) or _IMAGE
        for i, turn in enumerate(turns):
            if turn.role == GPT:
                parts += [(" " + turn.value, True), (self.eos_token_id, True)]
                continue
            fmt = self._turn_format(i, i == len(turns) - 1, hint, image and i == image_turn)
            values = {"system": t.system if system is None else system, "question": turn.value, "hint": hint}
            for literal, field, _, _ in string.Formatter().parse(fmt):
                before, slot, after = literal.partition(IMAGE_SLOT)
                parts.append((before, False))
                if slot:
                    parts += [_IMAGE, ("\n", False), (after, False)]
                if field is not None:
                    parts.append((values[field], False))
        ids, labels = [list(self.bos_ids)], [[IGNORE_INDEX] * len(self.bos_ids)]
        sides = _split(parts, _IMAGE) if self.prompt_format == "llava" else [parts]
        for k, side in enumerate(sides):
            if k:
                ids.append([self.image_token_id] * self.num_image_tokens)
                labels.append([IGNORE_INDEX] * self.num_image_tokens)
            side_ids, side_labels = self._tokenize(side)
            ids.append(side_ids)
            labels.append(side_labels)
        return np.concatenate(ids).astype(np.int32), np.concatenate(labels).astype(np.int32)

    def _tokenize(self, parts: list) -> tuple[list[int], list[int]]:
        """One string's parts -> (ids, labels); the image (hf format) becomes its positions."""
        pieces, answers, supervised, pos = [], [], [], 0
        for part in parts:
            if part is _IMAGE:
                pieces.append(self.image_token_id)
                supervised.append(False)
            elif isinstance(part[0], int):
                pieces.append(part[0])
                supervised.append(part[1])
            elif part[0]:
                pieces.append(part[0])
                if part[1]:
                    answers.append((pos, pos + len(part[0])))
                pos += len(part[0])
        tok_ids, offsets = self.specials.encode(pieces)
        ids, labels, placed = [], [], iter(supervised)
        for tok, off in zip(tok_ids, offsets):
            if off is None:  # a special placed here
                keep = next(placed)
                n = self.num_image_tokens if tok == self.image_token_id else 1
                ids += [tok] * n
                labels += [tok if keep else IGNORE_INDEX] * n
            else:
                ids.append(tok)
                labels.append(tok if any(s < off[1] and off[0] < e for s, e in answers) else IGNORE_INDEX)
        return ids, labels


def _split(parts: list, marker) -> list[list]:
    """parts -> the runs between `marker`s (len = markers + 1)."""
    runs = [[]]
    for part in parts:
        runs.append([]) if part is marker else runs[-1].append(part)
    return runs


def _check_roles(turns: Sequence[Turn], generation: bool) -> None:
    roles = [t.role for t in turns]
    want = [(HUMAN, GPT)[i % 2] for i in range(len(roles))]
    last = HUMAN if generation else GPT
    if not roles or roles != want or roles[-1] != last:
        raise ValueError(f"turns must alternate human/gpt from human and end with {last!r}, got {roles}")
