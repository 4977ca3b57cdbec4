"""Image + question -> safety verdict and answer (the library behind `safevlm_jax.sample`).

    vlm = SafeVLMInference.from_checkpoint("ckpt/", mesh=make_mesh({"tensor": 4}))
    [result] = vlm.answer([Request("cat.jpg", "What is shown here?")], max_new_tokens=64)
    print(result.verdict.line(), result.answer)

Per batch, on the engine's generation path (`inference.programs`): the verdict program (CLIP +
safety head; the verdict needs only the image and the first token, docs/safety_modules.md),
the safety gate on the host (`safety.gate.Gate`: hint or refusal), one prefill of every prompt,
each inserted into a row of a decode state, then a jitted `while_loop` of decode steps, or,
when the text is streamed (`on_text`), the jitted step looped from Python.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from safevlm_jax.checkpoint.assets import image_config
from safevlm_jax.data.errors import BadRecord
from safevlm_jax.data.images import ImageConfig, load_pixel_values
from safevlm_jax.data.template import ConversationTemplate, PROMPT_FORMATS
from safevlm_jax.data.tokenizer import check_matches_model
from safevlm_jax.inference.detokenize import Detokenizer, decode
from safevlm_jax.inference.errors import CONTEXT_LENGTH, BadRequest
from safevlm_jax.inference.runner import Runner
from safevlm_jax.inference.requests import SamplingParams
from safevlm_jax.safety.gate import Gate, Refusal
from safevlm_jax.safety.hints import HintConfig
from safevlm_jax.safety.policy import RiskPolicy
from safevlm_jax.safety.prompt import Conversation, PromptBuilder
from safevlm_jax.safety.verdict import Verdict


@dataclasses.dataclass(frozen=True)
class Request:
    """One question about one image, for `SafeVLMInference.answer`."""

    image: str  # a local JPEG/PNG/WebP file
    prompt: str  # the user's question (plain text)


@dataclasses.dataclass
class Result:
    """One request's answer.

    answer: decoded text (EOS dropped); token_ids: generated ids (with EOS if reached);
    verdict: None with safety off; timings: seconds and decode tokens/s; prompt_token_ids:
    the exact ids fed to the model, each image expanded to its positions (empty for a row the
    policy answered without generating)."""

    answer: str
    token_ids: list[int]
    verdict: Verdict | None
    timings: dict[str, float]
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)

    @property
    def hint_applied(self) -> bool:
        return self.verdict is not None and self.verdict.hint is not None

    def to_json(self) -> dict:
        v = self.verdict
        return {"answer": self.answer, "token_ids": self.token_ids, "prompt_token_ids": self.prompt_token_ids,
                "risk_level": v and v.risk_level, "risk_type": v and v.risk_type,
                "risk_type_name": v and v.risk_type_name,
                "risk_level_probs": v and list(v.risk_level_probs),
                "risk_type_probs": v and list(v.risk_type_probs),
                "hint_applied": self.hint_applied, "fail_closed": bool(v and v.fail_closed),
                "timings": self.timings}


def load_image(path: str, config: ImageConfig) -> np.ndarray:
    """A local image file -> pixel_values [S, S, 3] float32; BadRequest naming the file if it
    is missing, unreadable, corrupt or too large."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return load_pixel_values(data, config)
    except OSError as e:
        raise BadRequest(f"cannot read image {path}: {e.strerror or e}", "image", "missing_image") from e
    except BadRecord as e:
        raise BadRequest(f"cannot use image {path}: {e}", "image", e.reason) from e


def safety_gate(model, tokenizer, template: ConversationTemplate | str, hints: HintConfig,
                policy: RiskPolicy) -> Gate:
    """The gate of a model and tokenizer: a prompt builder per (safety on/off, prompt format)."""
    return Gate(policy, hints, {(safety, f): PromptBuilder(tokenizer, model.num_image_tokens(safety), template,
                                                           hints, f)
                                for safety in (True, False) for f in PROMPT_FORMATS})


class SafeVLMInference:
    """A model, its tokenizer and image settings, the safety gate and a `Runner`:
    `from_checkpoint(dir)`, then `answer([Request, ...])` -> one `Result` per request.

    template: a `ConversationTemplate` or its name (`from_checkpoint`: the checkpoint's own
    unless given); prompt_format: "llava" (LLaVA's `tokenizer_image_token` ids, what LLaVA-1.5
    was trained on) or "hf" (the ids HF's `LlavaProcessor` gives the same text); max_length:
    the context (default: the model's); mesh/rules: where the model runs (its parameters
    already there, e.g. from `from_checkpoint(..., mesh=...)`).
    """

    def __init__(self, model, tokenizer, images: ImageConfig, *, template: ConversationTemplate | str = "v1",
                 hints: HintConfig = HintConfig(), policy: RiskPolicy = RiskPolicy(),
                 max_length: int | None = None, prompt_format: str = "llava", mesh=None, rules: str = "inference"):
        check_matches_model(tokenizer, model.config)
        self.model, self.tokenizer, self.images, self.prompt_format = model, tokenizer, images, prompt_format
        self.gate = safety_gate(model, tokenizer, template, hints, policy)
        self.runner = Runner(model, max_length=max_length or model.config.text.max_position_embeddings,
                             eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, mesh=mesh, rules=rules)

    @classmethod
    def from_checkpoint(cls, directory: str, *, template: ConversationTemplate | str | None = None, mesh=None,
                        rules: str = "inference", **kw) -> "SafeVLMInference":
        """`template`: None = the one the checkpoint records (`checkpoint.format.load_template`);
        `mesh`: the parameters are restored straight into its shardings under `rules`."""
        import transformers

        from safevlm_jax.checkpoint.format import load_checkpoint, load_template

        config, model = load_checkpoint(directory, mesh, rules)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        return cls(model, tokenizer, image_config(directory, config),
                   template=load_template(directory) if template is None else template, mesh=mesh, rules=rules, **kw)

    def answer(self, requests: Sequence[Request], *, max_new_tokens: int = 128,
               sampling: SamplingParams = SamplingParams(), safety: bool = True,
               on_verdicts: Callable[[list[Verdict | None]], None] | None = None,
               on_text: Callable[[int, str], None] | None = None) -> list[Result]:
        """Answers a batch, every row with `sampling` (its seed too). `on_verdicts(verdicts)`
        is called once the verdicts are known (before generation); `on_text(row, text)`
        receives each row's answer as it grows."""
        if safety and not self.model.has_safety:
            raise ValueError("this checkpoint has no safety modules; run with safety off")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampling.check(self.model.config.text.vocab_size)
        start = time.perf_counter()
        pixels = np.stack([load_image(r.image, self.images) for r in requests])
        features, level, kind = self.runner.encode(pixels, [self.gate.query_id] * len(requests), safety)
        verdicts = self.gate.verdicts(level, kind) if safety else [None] * len(requests)
        encode_s = time.perf_counter() - start
        if on_verdicts:
            on_verdicts(verdicts)
        admitted = [self.gate.admit(v, Conversation.of(r.prompt), self.prompt_format, safety=safety)
                    for v, r in zip(verdicts, requests)]
        rows = [i for i, a in enumerate(admitted) if not isinstance(a, Refusal)]
        results: list[Result | None] = [None] * len(requests)
        for i, a in enumerate(admitted):
            if isinstance(a, Refusal):
                results[i] = Result(a.text, [], verdicts[i], {"encode_s": encode_s, "prefill_s": 0.0,
                                                              "decode_s": 0.0, "tokens_per_s": 0.0})
                if on_text:
                    on_text(i, a.text)
        if rows:
            prompts = [admitted[i] for i in rows]
            stream = on_text and (lambda row, text: on_text(rows[row], text))
            tokens, timings = self._generate(prompts, [features[i] for i in rows], sampling, max_new_tokens, safety,
                                             stream)
            for i, ids, prompt in zip(rows, tokens, prompts):
                results[i] = Result(self._text(ids), ids, verdicts[i], {"encode_s": encode_s, **timings}, prompt)
        return results

    def _generate(self, prompts: list[list[int]], features, sampling: SamplingParams, max_new: int,
                  use_safety: bool, on_text) -> tuple[list[list[int]], dict[str, float]]:
        """`Runner.generate`, each row's text streamed to `on_text(row, text)` if given."""
        longest = max(len(p) for p in prompts)
        if longest + max_new > self.runner.max_length:  # the longest request's own fault
            raise BadRequest(f"prompt of {longest} tokens + max_new_tokens={max_new} exceeds the context length "
                             f"{self.runner.max_length}", "max_new_tokens", CONTEXT_LENGTH)
        on_step = None
        if on_text:
            detok = [Detokenizer(self.tokenizer) for _ in prompts]
            on_step = lambda row, token, last: self._say(on_text, row, detok[row], token, last)
        return self.runner.generate(prompts, features, [sampling] * len(prompts), max_new, use_safety, on_step)

    def _say(self, on_text, row: int, detok: Detokenizer, token: int, last: bool) -> None:
        text = "" if token == self.tokenizer.eos_token_id else detok.push(token)
        text += detok.flush() if last else ""
        if text:
            on_text(row, text)

    def _text(self, ids: list[int]) -> str:
        if ids and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        return decode(self.tokenizer, ids)
