"""Risk policy: what to do for each (risk level, risk type) the safety head reports.

    policy = load_policy("policy.json")             # or RiskPolicy() = the paper's rules
    v = policy.decide(level_probs, type_probs)      # Verdict(level, type, probs, hint, action, ...)
    verdicts = policy.verdicts(level_logits, type_logits)   # [B, 4], [B, 7] head logits
    outputs = apply_policy(verdicts, generate, policy)   # `block` rows never reach generate

Per risk type, each action has the minimum level that triggers it (or none); the most
severe triggered action wins. `caution`, `may_refuse` and `refuse` add the safety prompt's
level-1/2/3 hint for that type (`safety.hints.HintConfig`); `block` answers with
`refusal` without running generation. The default is the paper's rule (docs/safety_modules.md):
level 0 or type 6 (clean) -> none; level 1 -> caution, 2 -> may_refuse, 3 -> refuse.

The level is the argmax of the level probabilities, or, with `level_thresholds`
{1: t1, 2: t2, 3: t3}, the highest l with P(level >= l) >= t_l (0 if none). The type is the
argmax. Non-finite head output fails closed: level 3, the most severe action any risky type
has at level 3, and the fail-closed hint.

A policy file (JSON; YAML when PyYAML is installed) lists only what differs from the
default; the rules given for a type replace that type's rules::

    {"rules": {"illegal risk": {"caution": 1, "may_refuse": 2, "block": 3},
               "privacy": {"refuse": 1}},
     "level_thresholds": {"1": 0.5, "2": 0.4, "3": 0.25},
     "refusal": "I'm sorry, but I can't help with that."}
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from safevlm_jax.safety.hints import HintConfig
from safevlm_jax.safety.taxonomy import CLEAN, RISK_LEVELS, RISK_TYPES
from safevlm_jax.safety.verdict import Verdict, json_probs, softmax

ACTIONS = ("none", "caution", "may_refuse", "refuse", "block")  # least to most severe
HINT_LEVEL = {"caution": 1, "may_refuse": 2, "refuse": 3}  # action -> hint text level
PAPER_RULE = {"caution": 1, "may_refuse": 2, "refuse": 3}
DEFAULT_REFUSAL = "I'm sorry, but I can't help with this request."
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RiskPolicy:
    """What to do for each (risk level, risk type): `verdicts(level_logits, type_logits)`.

    rules: {type index: {action: minimum level 0-3}} (missing action: never triggered);
    level_thresholds: None (argmax) or (t1, t2, t3); refusal: the `block` answer."""

    rules: Mapping[int, Mapping[str, int]] = dataclasses.field(
        default_factory=lambda: {t: dict(PAPER_RULE) for t in range(CLEAN)} | {CLEAN: {}})
    level_thresholds: tuple[float, float, float] | None = None
    refusal: str = DEFAULT_REFUSAL

    def __post_init__(self):
        if set(self.rules) != set(range(len(RISK_TYPES))):
            raise ValueError(f"rules must have one entry per risk type 0-{len(RISK_TYPES) - 1}, "
                             f"got {sorted(self.rules)}")

    def action_for(self, level: int, kind: int | None) -> str:
        """The most severe action triggered at (level, kind); kind None: the most severe
        over the risky types (fail closed)."""
        if kind is None:
            return max((self.action_for(level, t) for t in range(CLEAN)), key=ACTIONS.index)
        rule = self.rules[kind]
        return max((a for a, lv in rule.items() if level >= lv), key=ACTIONS.index, default="none")

    def level_of(self, level_probs: np.ndarray) -> int:
        """[num_levels] probabilities -> the decided level (argmax, or by thresholds)."""
        if self.level_thresholds is None:
            return int(np.argmax(level_probs))
        at_least = np.cumsum(np.asarray(level_probs, np.float64)[::-1])[::-1]  # P(level >= l)
        return max([0] + [lv for lv, t in enumerate(self.level_thresholds, 1) if at_least[lv] >= t])

    def decide(self, level_probs, type_probs, hints: HintConfig = HintConfig()) -> Verdict:
        """level_probs [4], type_probs [7] (one row, probabilities; NaN: not finite) -> Verdict."""
        level_probs, type_probs = np.asarray(level_probs, np.float64), np.asarray(type_probs, np.float64)
        level_ok, type_ok = bool(np.all(np.isfinite(level_probs))), bool(np.all(np.isfinite(type_probs)))
        kind = int(np.argmax(type_probs)) if type_ok else None
        fail_closed = not (level_ok and type_ok)
        level = 3 if fail_closed else self.level_of(level_probs)
        action = self.action_for(level, None if fail_closed else kind)
        if action not in HINT_LEVEL:
            hint = None
        else:
            hint = hints.fail_closed if fail_closed else hints.hints[(HINT_LEVEL[action], kind)]
        return Verdict(level, kind, json_probs(level_probs), json_probs(type_probs), hint, action, fail_closed)

    def verdicts(self, level_logits, type_logits, hints: HintConfig = HintConfig()) -> list[Verdict]:
        """The safety head's level_logits [B, 4] and type_logits [B, 7] -> one Verdict per row."""
        return [self.decide(lp, tp, hints) for lp, tp in zip(softmax(level_logits), softmax(type_logits))]


def apply_policy(verdicts: Sequence[Verdict], generate: Callable[[list[int]], Sequence[T]],
                 policy: RiskPolicy) -> list[T | str]:
    """Runs `generate(rows)` once, only for the rows not blocked (not at all if every row is
    blocked); it returns one output per given row. Blocked rows get `policy.refusal`."""
    rows = [i for i, v in enumerate(verdicts) if v.action != "block"]
    outputs: list[T | str] = [policy.refusal] * len(verdicts)
    if rows:
        generated = list(generate(rows))
        if len(generated) != len(rows):
            raise ValueError(f"generate returned {len(generated)} outputs for {len(rows)} rows")
        for i, out in zip(rows, generated):
            outputs[i] = out
    return outputs


# Loading -------------------------------------------------------------------------------------
def parse_policy(data: Any, where: str = "policy") -> RiskPolicy:
    """A policy from a parsed JSON/YAML mapping; ValueError naming `where` and the field."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping with keys rules, level_thresholds, refusal")
    unknown = sorted(set(data) - {"rules", "level_thresholds", "refusal"})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: rules, level_thresholds, refusal")
    default = RiskPolicy()
    rules = dict(default.rules)
    given = {} if data.get("rules") is None else data["rules"]
    if not isinstance(given, Mapping):
        raise ValueError(f"{where}: rules: expected a mapping {{risk type: {{action: level}}}}")
    for key, rule in given.items():
        kind = _type_index(key, f"{where}: rules.{key}")
        rules[kind] = _rule(rule, kind, f"{where}: rules.{key}")
    thresholds = data.get("level_thresholds")
    if thresholds is not None:
        thresholds = _thresholds(thresholds, f"{where}: level_thresholds")
    refusal = data.get("refusal", default.refusal)
    if not isinstance(refusal, str) or not refusal.strip():
        raise ValueError(f"{where}: refusal: expected a non-empty string, got {refusal!r}")
    return RiskPolicy(rules, thresholds, refusal)


def load_policy(path: str | os.PathLike) -> RiskPolicy:
    """Reads a policy file (.json; .yaml/.yml needs PyYAML)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise ValueError(f"{path}: YAML policy files need PyYAML (pip install pyyaml); "
                             f"or write the policy as JSON") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
    return parse_policy(data, path)


def _type_index(key, where: str) -> int:
    if isinstance(key, str) and key in RISK_TYPES:
        return RISK_TYPES.index(key)
    try:
        index = int(key)
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(RISK_TYPES):
        raise ValueError(f"{where}: unknown risk type {key!r}; use 0-{len(RISK_TYPES) - 1} or one of "
                         f"{list(RISK_TYPES)}")
    return index


def _rule(rule, kind: int, where: str) -> dict[str, int]:
    if not isinstance(rule, Mapping):
        raise ValueError(f"{where}: expected a mapping {{action: minimum level}}, got {rule!r}")
    out = {}
    for action, level in rule.items():
        if action not in ACTIONS[1:]:
            raise ValueError(f"{where}.{action}: unknown action; known: {list(ACTIONS[1:])}")
        if kind == CLEAN and action in HINT_LEVEL:
            raise ValueError(f"{where}.{action}: the clean type has no hint text; it may only use block")
        if level is None:
            continue
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < len(RISK_LEVELS):
            raise ValueError(f"{where}.{action}: expected a level 0-{len(RISK_LEVELS) - 1} or null, "
                             f"got {level!r}")
        out[action] = level
    return out


def _thresholds(thresholds, where: str) -> tuple[float, float, float]:
    if not isinstance(thresholds, Mapping):
        raise ValueError(f"{where}: expected a mapping {{level 1-3: probability}}, got {thresholds!r}")
    values = {}
    for key, p in thresholds.items():
        try:
            level = int(key)
        except (TypeError, ValueError):
            level = -1
        if level not in (1, 2, 3):
            raise ValueError(f"{where}.{key}: expected a level 1, 2 or 3")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"{where}.{key}: expected a probability in [0, 1], got {p!r}")
        values[level] = float(p)
    missing = sorted({1, 2, 3} - set(values))
    if missing:
        raise ValueError(f"{where}: missing level(s) {missing}; give a threshold for each of 1, 2, 3")
    return values[1], values[2], values[3]
