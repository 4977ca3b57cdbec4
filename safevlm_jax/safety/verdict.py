"""One row's safety verdict: the decided risk level and type, the probabilities, the risk
policy's action and the hint it adds to the prompt (`RiskPolicy.verdicts` makes them from the
safety head's logits; docs/safety_modules.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from safevlm_jax.safety.taxonomy import HINT_SUMMARY, RISK_LEVELS, RISK_TYPES


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One row's safety verdict (`RiskPolicy.verdicts` makes them).

    risk_type is None only when fail_closed and the type output was not finite; probs are
    None where the head's output was not finite (JSON has no NaN); action is the policy's
    (`safety.policy.ACTIONS`); hint is the text added to the prompt (None: unchanged)."""

    risk_level: int
    risk_type: int | None
    risk_level_probs: tuple[float | None, ...]
    risk_type_probs: tuple[float | None, ...]
    hint: str | None
    action: str = "none"
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


def softmax(logits) -> np.ndarray:
    """logits [..., K] -> probabilities [..., K] in f64; a row with a non-finite logit is all
    NaN (it must not be trusted: the policy fails closed on it)."""
    x = np.asarray(logits, np.float64)
    finite = np.all(np.isfinite(x), axis=-1, keepdims=True)
    safe = np.where(finite, x, 0.0)
    e = np.exp(safe - safe.max(axis=-1, keepdims=True))
    return np.where(finite, e / e.sum(axis=-1, keepdims=True), np.nan)


def json_probs(probs) -> tuple[float | None, ...]:
    """[K] probabilities -> floats, None where not finite."""
    return tuple(float(p) if np.isfinite(p) else None for p in np.asarray(probs, np.float64))
