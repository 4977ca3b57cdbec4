"""Response bodies in OpenAI's format, with SafeVLM's verdict added.

Chat: `choices[0].safety` = {risk_level, risk_level_name, risk_type, risk_type_name,
risk_level_probs [4], risk_type_probs [7], hint_applied, action, fail_closed} (null when the
request ran with safety off). The engine's finish reasons map to OpenAI's: stop, length, and
`blocked` (the policy answered with its refusal, no generation) -> `content_filter`.

Moderation categories are our 6 risky types (the 7th, clean, is no category):

    category                risk type (index, docs/safety_modules.md)
    politics                0 politics
    illegal_risk            1 illegal risk
    insults_and_bullying    2 insults and bullying
    fairness                3 fairness
    privacy                 4 privacy
    misleading              5 misleading

Where a type matches one of OpenAI's moderation categories, the result carries it under
OpenAI's name too (same flag, score and input types), so a client reading `harassment`,
`hate` or `illicit` finds them; OpenAI has no category for the others:

    our category            OpenAI's category
    illegal_risk            illicit       (advice or instruction for illegal acts)
    insults_and_bullying    harassment    (harassing language towards any target)
    fairness                hate          (demeaning a group for race, gender, religion, ...)

`category_scores[c]` = P(type = c) · P(level >= 1), the head's probability that the image is
risky *and* of that type. `flagged` = the risk policy acts on the verdict (any action but
`none`; by default level >= 1 and type not clean); `categories[c]` = flagged and the decided
type is c. A fail-closed verdict (non-finite head output) flags every category with score 1.
Several images in one input are one result: flags OR-ed, scores and level the maximum.
Extra fields: `risk_level`, `risk_level_name`, and `safety` (one verdict object per image).
"""

from __future__ import annotations

import secrets
import time

from safevlm_jax.safety.taxonomy import CLEAN, RISK_LEVELS, RISK_TYPES
from safevlm_jax.safety.verdict import Verdict

CATEGORIES = tuple(name.replace(" ", "_") for name in RISK_TYPES[:CLEAN])
OPENAI_CATEGORIES = {"illegal_risk": "illicit", "insults_and_bullying": "harassment", "fairness": "hate"}
FINISH_REASONS = {"stop": "stop", "length": "length", "blocked": "content_filter"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def model_card(model_id: str) -> dict:
    """One model of `/v1/models` (OpenAI's `model` object)."""
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "safevlm_jax"}


def safety_object(verdict: Verdict | None) -> dict | None:
    """The verdict as JSON (probabilities None when the head's output was not finite)."""
    if verdict is None:
        return None
    return {"risk_level": verdict.risk_level, "risk_level_name": RISK_LEVELS[verdict.risk_level],
            "risk_type": verdict.risk_type, "risk_type_name": verdict.risk_type_name,
            "risk_level_probs": list(verdict.risk_level_probs),
            "risk_type_probs": list(verdict.risk_type_probs),
            "hint_applied": verdict.hint is not None, "action": verdict.action,
            "fail_closed": verdict.fail_closed}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(index: int, text: str, finish_reason: str, safety: dict | None, logprobs: dict | None) -> dict:
    """One choice of a `chat.completion`."""
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": FINISH_REASONS[finish_reason], "safety": safety}


def chat_completion(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               index: int = 0, logprobs: dict | None = None, **extra) -> dict:
    """One `chat.completion.chunk`; `extra` goes into the choice (the first chunk's `safety`)."""
    choice = {"index": index, "delta": delta, "logprobs": logprobs,
              "finish_reason": finish_reason and FINISH_REASONS[finish_reason], **extra}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice]}


class TokenTexts:
    """Token ids -> the text and bytes OpenAI's logprobs show for them (a token's text as it
    reads after another token, so SentencePiece's word-start space is kept)."""

    def __init__(self, tokenizer):
        self.tokenizer, self._texts = tokenizer, {}
        self._anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
        self._skip = len(tokenizer.decode(self._anchor))

    def text(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self.tokenizer.decode(self._anchor + [token])[self._skip:]
        return self._texts[token]

    def entry(self, token: int, logprob: float, first: bool = False) -> dict:
        text = self.text(token)
        if first and text.startswith(" "):  # as the answer's text (`detokenize.decode`) starts
            text = text[1:]
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def content(self, logprobs, top: int, first: bool = False) -> dict:
        """A TextEvent's (token, logprob, top ids, top logprobs) entries -> OpenAI's
        `{"content": [...]}` with `top` alternatives each; `first`: they start the answer, whose
        first word-start space is dropped, so the tokens add up to the answer's text."""
        return {"content": [{**self.entry(t, lp, first and n == 0),
                             "top_logprobs": [self.entry(i, p, first and n == 0) for i, p in zip(ids[:top], lps[:top])]}
                            for n, (t, lp, ids, lps) in enumerate(logprobs)], "refusal": None}


def usage_chunk(rid: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk with `stream_options.include_usage` (no choices, as OpenAI sends it)."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def moderation_result(verdicts: list[Verdict]) -> dict:
    """One input's result from its images' verdicts (with the policy's actions)."""
    flags, scores, levels = {c: False for c in CATEGORIES}, {c: 0.0 for c in CATEGORIES}, []
    for verdict in verdicts:
        flagged = verdict.action != "none"
        levels.append(verdict.risk_level)
        for t, c in enumerate(CATEGORIES):
            if verdict.fail_closed:
                score, hit = 1.0, True
            else:
                score = verdict.risk_type_probs[t] * (1.0 - verdict.risk_level_probs[0])
                hit = flagged and verdict.risk_type == t
            scores[c] = max(scores[c], score)
            flags[c] = flags[c] or hit
    level = max(levels)
    worst = verdicts[levels.index(level)]
    return {"flagged": any(v.action != "none" for v in verdicts), "categories": _with_openai_names(flags),
            "category_scores": _with_openai_names(scores),
            "category_applied_input_types": _with_openai_names({c: ["image"] if flags[c] else [] for c in CATEGORIES}),
            "risk_level": level, "risk_level_name": RISK_LEVELS[level],
            "risk_level_probs": list(worst.risk_level_probs),
            "safety": [safety_object(v) for v in verdicts]}


def _with_openai_names(by_category: dict) -> dict:
    return {**by_category, **{openai: by_category[ours] for ours, openai in OPENAI_CATEGORIES.items()}}
