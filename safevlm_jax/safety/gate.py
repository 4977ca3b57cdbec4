"""The safety gate: from the safety head's logits to what a request may do, for every path
(`SafeVLMInference.answer`, the serving engine, moderation, guard scans).

    gate = Gate(policy, hints, builders)                # builders: {(safety, format): PromptBuilder}
    [verdict] = gate.verdicts(level_logits, type_logits)        # [B, 4], [B, 7] -> Verdicts
    admitted = gate.admit(verdict, Conversation.of("What is shown?"), "llava")
    if isinstance(admitted, Refusal): ...               # the policy blocks: answer admitted.text
    else: prompt_ids = admitted                         # the hint (if any) inserted as ids
    room = gate.max_prompt_len(conversation, "llava")   # the longest prompt admit could give

A verdict None (safety off, or no image) admits the conversation as it is. The head's query
token is every prompt's first (`gate.query_id`, `safety.prompt.query_id`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from safevlm_jax.safety.hints import HintConfig
from safevlm_jax.safety.policy import HINT_LEVEL, RiskPolicy
from safevlm_jax.safety.prompt import Conversation, PromptBuilder
from safevlm_jax.safety.taxonomy import CLEAN
from safevlm_jax.safety.verdict import Verdict


@dataclasses.dataclass(frozen=True)
class Refusal:
    """The policy blocks the request: `text` is its answer (no generation runs)."""

    text: str


class Gate:
    """policy: the risk policy; hints: the hint texts; builders: a `PromptBuilder` per
    (safety on/off, prompt format) (safety on: the image positions include the safety tokens)."""

    def __init__(self, policy: RiskPolicy, hints: HintConfig, builders: Mapping[tuple[bool, str], PromptBuilder]):
        self.policy, self.hints, self.builders = policy, hints, dict(builders)
        first = {b.query_id for b in self.builders.values()}
        if len(first) != 1:
            raise ValueError(f"the prompt builders start their prompts with different tokens {sorted(first)}")
        self.query_id = first.pop()
        self._hints = self._possible_hints()

    def verdicts(self, level_logits, type_logits) -> list[Verdict]:
        """The safety head's logits [B, 4], [B, 7] -> one Verdict per row (`RiskPolicy.verdicts`)."""
        return self.policy.verdicts(level_logits, type_logits, self.hints)

    def admit(self, verdict: Verdict | None, conversation: Conversation, prompt_format: str = "llava", *,
              safety: bool = True, image: bool = True) -> Refusal | list[int]:
        """The policy's `Refusal` for a blocked verdict, else the prompt's ids with the
        verdict's hint; `safety`: the builder with the safety tokens' image positions."""
        if verdict is not None and verdict.action == "block":
            return Refusal(self.policy.refusal)
        hint = None if verdict is None else verdict.hint
        return self.builders[(safety, prompt_format)].build(conversation, hint, image)

    def max_prompt_len(self, conversation: Conversation, prompt_format: str = "llava", *, safety: bool = True,
                       image: bool = True) -> int:
        """The most ids `admit` can give this conversation, over every hint the policy can
        choose for it (none without a verdict: `safety` off or no `image`)."""
        builder = self.builders[(safety, prompt_format)]
        hints = self._hints if safety and image else [None]
        return max(len(builder.build(conversation, h, image)) for h in hints)

    def _possible_hints(self) -> list[str | None]:
        """Every hint the policy can add (the fail-closed one included), and None."""
        hints = {None}
        for kind in range(CLEAN):
            for action in self.policy.rules[kind]:
                if action in HINT_LEVEL:
                    hints.add(self.hints.hints[(HINT_LEVEL[action], kind)])
        if self.policy.action_for(3, None) in HINT_LEVEL:
            hints.add(self.hints.fail_closed)
        return sorted(hints, key=lambda h: h or "")
