"""One row's safety verdict, from the safety head's logits.

Level 0 or type 6 (clean) leaves the prompt unchanged; otherwise the hint for (level, type)
is added. Non-finite head output is treated as level 3 with a generic refusal hint (fail
closed).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from safevlm_jax.safety.hints import HintConfig
from safevlm_jax.safety.taxonomy import CLEAN, HINT_SUMMARY, RISK_LEVELS, RISK_TYPES


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
