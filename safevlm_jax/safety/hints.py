"""The conditional safety prompt's hint texts: one per (risk level 1-3, risky type 0-5).

The defaults are ours, graded by level as the paper describes (1: respond cautiously,
2: answer with caution and possibly refuse, 3: refuse); `load_hints` replaces any of them from
a file, e.g. with the authors' exact texts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

from safevlm_jax.safety.taxonomy import CLEAN, RISK_LEVELS, RISK_TYPES

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
    """The conditional safety prompt's texts.

    hints: {(level 1-3, type 0-5): text}; prefix introduces the hint; fail_closed is the
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
