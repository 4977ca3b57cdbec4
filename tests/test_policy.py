"""Risk policy: the default is the paper's rule, files are validated, `block` skips generation."""

import json

import numpy as np
import pytest

from safevlm_jax.safety.hints import HintConfig
from safevlm_jax.safety.hints import DEFAULT_FAIL_CLOSED, DEFAULT_HINTS
from safevlm_jax.safety.policy import RiskPolicy, apply_policy, load_policy, parse_policy
from safevlm_jax.safety.verdict import softmax


def one_hot_probs(index: int, n: int) -> np.ndarray:
    p = np.full(n, 0.1 / (n - 1))
    p[index] = 0.9
    return p


@pytest.mark.parametrize("level", range(4))
@pytest.mark.parametrize("kind", range(7))
def test_default_policy_equals_paper_rules_for_every_level_and_type(level, kind):
    d = RiskPolicy().decide(one_hot_probs(level, 4), one_hot_probs(kind, 7))
    paper = "none" if level == 0 or kind == 6 else ("caution", "may_refuse", "refuse")[level - 1]
    assert (d.risk_level, d.risk_type, d.action) == (level, kind, paper)
    assert d.hint == (None if paper == "none" else DEFAULT_HINTS[level, kind])
    [v] = RiskPolicy().verdicts([np.log(one_hot_probs(level, 4))], [np.log(one_hot_probs(kind, 7))])
    assert (v.risk_level, v.risk_type, v.action, v.hint) == (d.risk_level, d.risk_type, d.action, d.hint)
    np.testing.assert_allclose(v.risk_level_probs, d.risk_level_probs, rtol=1e-12)  # softmax(log p) = p


def test_default_policy_verdicts_follow_the_paper_rule_and_fail_closed_on_non_finite_logits():
    rng = np.random.default_rng(0)
    level, kind = rng.normal(size=(64, 4)) * 3, rng.normal(size=(64, 7)) * 3
    level[0, 1], kind[1, 2], level[2, 0], kind[2, 0] = np.nan, np.inf, np.nan, np.nan
    verdicts = RiskPolicy().verdicts(level, kind)
    for v, lv, ty in zip(verdicts[3:], level[3:], kind[3:]):
        want_level, want_type = int(np.argmax(lv)), int(np.argmax(ty))
        assert (v.risk_level, v.risk_type, v.fail_closed) == (want_level, want_type, False)
        assert v.hint == (None if want_level == 0 or want_type == 6 else DEFAULT_HINTS[want_level, want_type])
        np.testing.assert_allclose(v.risk_level_probs, softmax(lv), rtol=1e-12)
    assert [v.fail_closed for v in verdicts[:3]] == [True, True, True]
    assert [v.risk_level for v in verdicts[:3]] == [3, 3, 3]
    assert {v.action for v in verdicts[:3]} == {"refuse"}
    assert {v.hint for v in verdicts[:3]} == {DEFAULT_FAIL_CLOSED}
    assert verdicts[1].risk_type is None and None in verdicts[0].risk_level_probs


def test_policy_file_replaces_only_the_listed_types(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"rules": {"illegal risk": {"caution": 1, "block": 3}, "4": {"refuse": 1}},
                                "refusal": "No."}))
    policy = load_policy(path)
    assert [policy.action_for(lv, 1) for lv in range(4)] == ["none", "caution", "caution", "block"]
    assert [policy.action_for(lv, 4) for lv in range(4)] == ["none", "refuse", "refuse", "refuse"]
    assert [policy.action_for(lv, 0) for lv in range(4)] == ["none", "caution", "may_refuse", "refuse"]
    assert policy.refusal == "No."
    d = policy.decide(one_hot_probs(1, 4), one_hot_probs(4, 7))
    assert d.hint == HintConfig().hints[(3, 4)]  # `refuse` uses the level-3 hint of its type


def test_yaml_policy_file_loads_like_json(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("rules:\n  politics: {block: 2}\nlevel_thresholds: {1: 0.5, 2: 0.4, 3: 0.3}\n")
    policy = load_policy(path)
    assert policy.action_for(2, 0) == "block" and policy.level_thresholds == (0.5, 0.4, 0.3)


def test_level_thresholds_pick_the_highest_level_whose_cumulative_probability_reaches_them():
    policy = parse_policy({"level_thresholds": {"1": 0.5, "2": 0.4, "3": 0.25}})
    risky_type = one_hot_probs(1, 7)
    # argmax is 0, but P(level >= 1) = 0.6 and P(level >= 3) = 0.3
    assert policy.decide([0.4, 0.2, 0.1, 0.3], risky_type).risk_level == 3
    assert policy.decide([0.6, 0.3, 0.05, 0.05], risky_type).risk_level == 0
    assert policy.decide([0.45, 0.1, 0.3, 0.15], risky_type).risk_level == 2


@pytest.mark.parametrize("data, field", [
    ({"rule": {}}, "unknown field(s) ['rule']"),
    ({"rules": []}, "rules: expected a mapping"),
    ({"rules": {"weapons": {"refuse": 3}}}, "rules.weapons: unknown risk type"),
    ({"rules": {"9": {"refuse": 3}}}, "rules.9: unknown risk type"),
    ({"rules": {"privacy": {"deny": 3}}}, "rules.privacy.deny: unknown action"),
    ({"rules": {"privacy": {"refuse": 7}}}, "rules.privacy.refuse: expected a level 0-3"),
    ({"rules": {"privacy": {"refuse": "high"}}}, "rules.privacy.refuse: expected a level 0-3"),
    ({"rules": {"privacy": ["refuse"]}}, "rules.privacy: expected a mapping"),
    ({"rules": {"clean": {"caution": 1}}}, "rules.clean.caution: the clean type has no hint"),
    ({"level_thresholds": {"1": 0.5, "2": 1.5, "3": 0.2}}, "level_thresholds.2: expected a probability"),
    ({"level_thresholds": {"1": 0.5, "2": 0.5}}, "level_thresholds: missing level(s) [3]"),
    ({"level_thresholds": {"0": 0.5}}, "level_thresholds.0: expected a level 1, 2 or 3"),
    ({"refusal": ""}, "refusal: expected a non-empty string"),
])
def test_invalid_policy_file_error_names_the_field(tmp_path, data, field):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:
        load_policy(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_unparsable_policy_file_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{rules: ")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_policy(path)


def test_block_never_calls_the_generation_program():
    calls = []

    def generate(rows):
        calls.append(list(rows))
        return [f"answer {i}" for i in rows]

    policy = parse_policy({"rules": {t: {"block": 1} for t in range(6)}, "refusal": "Refused."})
    risky = policy.decide(one_hot_probs(2, 4), one_hot_probs(1, 7))
    safe = policy.decide(one_hot_probs(0, 4), one_hot_probs(1, 7))
    assert risky.action == "block" and risky.hint is None

    assert apply_policy([risky, risky], generate, policy) == ["Refused.", "Refused."]
    assert calls == []  # all rows blocked: generation never ran
    assert apply_policy([risky, safe, risky], generate, policy) == ["Refused.", "answer 1", "Refused."]
    assert calls == [[1]]  # one call, only the row that was not blocked
