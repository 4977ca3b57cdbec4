"""Conditional safety prompt (SPEC §2): the head's verdict decides a hint added to the prompt.

    verdict = verdict_from_logits(level_logits, type_logits)  # argmax of each, fail closed
    ids = PromptBuilder(tokenizer, num_image_tokens).build(question, verdict.hint)

Level 0 or type 6 (clean) leaves the prompt unchanged; otherwise the hint for (level, type)
goes into the user turn after the question, introduced by `Safe Hint:`, before `ASSISTANT:`.
The hint is decided here and inserted as token ids: user text is tokenized on its own as
plain text (`split_special_tokens=True`), so typing `Safe Hint: ...`, `<image>` or `</s>`
gives ordinary tokens and never changes the verdict, the hint or the image positions.
Non-finite head output is treated as level 3 with a generic refusal hint (fail closed).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import numpy as np

from safevlm_jax.data.records import HUMAN, Turn
from safevlm_jax.data.template import TextEncoder

RISK_LEVELS = ("safe", "low", "medium", "high")
RISK_TYPES = ("politics", "illegal risk", "insults and bullying", "fairness", "privacy",
              "misleading", "clean")
CLEAN = 6
HINT_SUMMARY = ("none", "caution", "caution+may refuse", "must refuse")
TEMPLATES = {"llava_v1": "v1", "psa": "psa"}  # our names -> `safevlm_jax.data.template` names

_SORRY = "I'm sorry, but I can't"
DEFAULT_HINTS: dict[tuple[int, int], str] = {
    (1, 0): "this image may contain risks of politics; respond cautiously, keep political "
            "propaganda and partisan claims out of the answer, and guide the user positively.",
    (1, 1): "this image may contain risks of illegal activity; respond cautiously, keep any "
            "instructions for illegal acts out of the answer, and guide the user positively.",
    (1, 2): "this image may contain risks of insults and bullying; respond cautiously, keep "
            "insulting or demeaning content out of the answer, and guide the user positively.",
    (1, 3): "this image may contain risks of unfairness; respond cautiously, keep stereotypes "
            "and discrimination out of the answer, and guide the user positively.",
    (1, 4): "this image may contain risks to privacy; respond cautiously, keep personal and "
            "identifying information out of the answer, and guide the user positively.",
    (1, 5): "this image may contain misleading content; respond cautiously, keep unverified "
            "claims out of the answer, and guide the user positively.",
    (2, 0): "this image contains risks of politics; answer with caution, stay neutral and "
            "factual, avoid political propaganda; you may refuse if necessary.",
    (2, 1): "this image contains risks of illegal activity; answer with caution, give no help "
            "with illegal acts; you may refuse if necessary.",
    (2, 2): "this image contains risks of insults and bullying; answer with caution, repeat no "
            "insults and do not target anyone; you may refuse if necessary.",
    (2, 3): "this image contains risks of unfairness; answer with caution, avoid stereotypes "
            "and discrimination; you may refuse if necessary.",
    (2, 4): "this image contains risks to privacy; answer with caution, identify no one and "
            "reveal no personal data; you may refuse if necessary.",
    (2, 5): "this image contains misleading content; answer with caution, correct false "
            "claims and do not spread them; you may refuse if necessary.",
    (3, 0): f"this image contains serious risks of politics; you must refuse and answer: "
            f"{_SORRY} help with politically harmful content.",
    (3, 1): f"this image contains serious risks of illegal activity; you must refuse and answer: "
            f"{_SORRY} help with illegal activities.",
    (3, 2): f"this image contains serious risks of insults and bullying; you must refuse and "
            f"answer: {_SORRY} help with insulting or bullying anyone.",
    (3, 3): f"this image contains serious risks of unfairness; you must refuse and answer: "
            f"{_SORRY} help with discriminatory content.",
    (3, 4): f"this image contains serious risks to privacy; you must refuse and answer: "
            f"{_SORRY} help with revealing private information.",
    (3, 5): f"this image contains serious risks of misleading content; you must refuse and "
            f"answer: {_SORRY} help with spreading misleading content.",
}
DEFAULT_FAIL_CLOSED = (f"the safety check of this image failed; you must refuse and answer: "
                       f"{_SORRY} help with this request.")


@dataclasses.dataclass(frozen=True)
class HintConfig:
    """hints: {(level 1-3, type 0-5): text}; prefix introduces the hint; fail_closed is the
    hint when the head's output is not finite."""

    hints: Mapping[tuple[int, int], str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_HINTS))
    prefix: str = "Safe Hint:"
    fail_closed: str = DEFAULT_FAIL_CLOSED

    def __post_init__(self):
        want = {(lv, ty) for lv in (1, 2, 3) for ty in range(CLEAN)}
        if set(self.hints) != want:
            raise ValueError(f"hints must cover levels 1-3 x types 0-5; missing "
                             f"{sorted(want - set(self.hints))}, unexpected {sorted(set(self.hints) - want)}")


def load_hints(path: str | os.PathLike, base: HintConfig | None = None) -> HintConfig:
    """Replaces hint texts from a JSON or YAML file (any subset)::

        prefix: "Safe Hint:"            # optional
        fail_closed: "..."              # optional
        hints: {2: {"illegal risk": "...", 0: "..."}, 3: {...}}   # level -> type (name or id)
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if os.fspath(path).endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    base = base or HintConfig()
    if not isinstance(data, dict) or set(data) - {"prefix", "fail_closed", "hints"}:
        raise ValueError(f"{path}: expected a mapping with keys prefix, fail_closed, hints")
    hints = dict(base.hints)
    for level, per_type in (data.get("hints") or {}).items():
        for kind, hint in per_type.items():
            key = (_index(level, RISK_LEVELS, path, "level"), _index(kind, RISK_TYPES, path, "type"))
            if key not in hints or not isinstance(hint, str):
                raise ValueError(f"{path}: hints.{level}.{kind}: need a text for level 1-3 and type 0-5")
            hints[key] = hint
    return HintConfig(hints, data.get("prefix", base.prefix), data.get("fail_closed", base.fail_closed))


def _index(key, names: Sequence[str], path, what: str) -> int:
    if isinstance(key, str) and key in names:
        return names.index(key)
    try:
        return int(key)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: unknown risk {what} {key!r}; use 0-{len(names) - 1} or one of {list(names)}")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One row's safety verdict. risk_type is None only when fail_closed and the type logits
    were not finite; hint is the text added to the prompt (None: prompt unchanged)."""

    risk_level: int
    risk_type: int | None
    risk_level_probs: tuple[float | None, ...]
    risk_type_probs: tuple[float | None, ...]
    hint: str | None
    fail_closed: bool = False

    @property
    def risk_type_name(self) -> str:
        return "unknown" if self.risk_type is None else RISK_TYPES[self.risk_type]

    @property
    def hint_summary(self) -> str:
        return HINT_SUMMARY[self.risk_level] if self.hint is not None else "none"

    def line(self) -> str:
        """`risk: level 2 (medium), type illegal risk; hint: caution+may refuse`."""
        why = ", fail-closed: safety head output not finite" if self.fail_closed else ""
        return (f"risk: level {self.risk_level} ({RISK_LEVELS[self.risk_level]}{why}), "
                f"type {self.risk_type_name}; hint: {self.hint_summary}")


def _softmax(x: np.ndarray) -> tuple[float | None, ...]:
    """Probabilities, or all None when the logits are not finite (JSON has no NaN)."""
    if not np.all(np.isfinite(x)):
        return (None,) * x.shape[0]
    e = np.exp(x - x.max())
    return tuple(float(v) for v in e / e.sum())


def verdict_from_logits(level_logits: np.ndarray, type_logits: np.ndarray,
                        hints: HintConfig = HintConfig()) -> Verdict:
    """level_logits [4], type_logits [7] (one row) -> Verdict; non-finite -> level 3."""
    level_logits, type_logits = np.asarray(level_logits, np.float64), np.asarray(type_logits, np.float64)
    level_ok, type_ok = np.all(np.isfinite(level_logits)), np.all(np.isfinite(type_logits))
    kind = int(np.argmax(type_logits)) if type_ok else None
    probs = (_softmax(level_logits), _softmax(type_logits))
    if not (level_ok and type_ok):
        return Verdict(3, kind, *probs, hint=hints.fail_closed, fail_closed=True)
    level = int(np.argmax(level_logits))
    hint = None if level == 0 or kind == CLEAN else hints.hints[(level, kind)]
    return Verdict(level, kind, *probs, hint=hint)


class PromptBuilder:
    """Generation prompts as token ids for a template (`llava_v1` or `psa`):

      llava_v1: <s>{system} USER: [IMG]\\n{question}[ Safe Hint: {hint}] ASSISTANT:
      psa:      <s>[IMG]\\n{system} USER: {question}[ Safe Hint: {hint}] ASSISTANT:

    [IMG] = `num_image_tokens` image ids. The text after the image is one chunk, tokenized as
    the data pipeline (`TextEncoder`) and LLaVA tokenize it: without a hint the ids equal
    `TextEncoder.encode_prompt`. A hint's ids are inserted by the program between the
    question's ids and the tail's, each taken as the tokenizer splits them inside the chunk,
    so SentencePiece-style tokenizers (LLaMA's) add no word-start marker at the seams.
    """

    def __init__(self, tokenizer, num_image_tokens: int, template: str = "llava_v1",
                 hints: HintConfig = HintConfig()):
        if template not in TEMPLATES:
            raise ValueError(f"unknown prompt template {template!r}; known: {sorted(TEMPLATES)}")
        self.encoder = TextEncoder(tokenizer, num_image_tokens, max_len=1 << 30,
                                   template=TEMPLATES[template])
        self.tokenizer, self.hints = tokenizer, hints
        t = self.encoder.template
        image = [self.encoder.image_token_id] * num_image_tokens
        if t.image_position == "first_user_turn":
            self._head = self.encoder.bos_ids + self._plain(f"{t.system}{t.sep}{t.roles[0]}: ") + image
            self._question = "\n{}"  # the chunk after the image
        else:
            self._head = self.encoder.bos_ids + image
            self._question = f"\n{t.system}{t.sep}{t.roles[0]}: {{}}"
        self._tail = f"{t.sep}{t.roles[1]}:"

    def build(self, question: str, hint: str | None = None) -> list[int]:
        """Token ids of the prompt; `question` is untrusted plain text, `hint` ours."""
        asked = self._question.format(question)
        if hint is None:
            return self._head + self._plain(asked + self._tail)
        hint_text = f"{self.encoder.template.sep}{self.hints.prefix} {hint}"
        return self._head + self._joined([asked, hint_text, self._tail])

    def reference(self, question: str) -> list[int]:
        """The data pipeline's prompt for `question` (no hint), for checks."""
        return self.encoder.encode_prompt([Turn(HUMAN, question)]).tolist()

    def _joined(self, pieces: Sequence[str]) -> list[int]:
        """The pieces' ids one after the other, each as the tokenizer splits it right after
        the text before it: what the text up to its end has past the text up to its start.
        If the two share a token at the seam (user text ending in spaces, say), the piece is
        tokenized on its own, so the ids before it stay as they are."""
        ids, text, before = [], "", []
        for piece in pieces:
            text += piece
            upto = self._plain(text)
            ids += upto[len(before):] if upto[:len(before)] == before else self._plain(piece)
            before = upto
        return ids

    def _plain(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        bad = self.encoder.forbidden_ids.intersection(ids)
        if bad:
            raise ValueError(f"tokenizer turned plain text into special ids {sorted(bad)}: {text!r}")
        return list(ids)
