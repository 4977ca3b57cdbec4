"""Image + question -> safety verdict and answer (the library behind `safevlm_jax.sample`).

    vlm = SafeVLMInference.from_checkpoint("ckpt/")
    [result] = vlm.answer([Request("cat.jpg", "What is shown here?")], max_new_tokens=64)
    print(result.verdict.line(), result.answer)

Per batch: one small jitted call runs CLIP and the safety head (the verdict needs only the
image and the first token, docs/safety_modules.md), the hints are chosen on the host, then one
jitted prefill+decode program generates every row (`safevlm_jax.inference.decode`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from safevlm_jax.checkpoint.assets import image_config
from safevlm_jax.data.errors import BadRecord
from safevlm_jax.data.template import ConversationTemplate
from safevlm_jax.data.images import ImageConfig, load_pixel_values
from safevlm_jax.data.tokenizer import check_matches_model
from safevlm_jax.inference.decode import Decoder
from safevlm_jax.inference.detokenize import Detokenizer
from safevlm_jax.inference.errors import BadRequest
from safevlm_jax.inference.sampling import Greedy
from safevlm_jax.safety.hints import HintConfig
from safevlm_jax.safety.policy import RiskPolicy, apply_policy
from safevlm_jax.safety.prompt import PromptBuilder
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
        raise BadRequest(f"cannot read image {path}: {e.strerror or e}") from e
    except BadRecord as e:
        raise BadRequest(f"cannot use image {path}: {e}") from e


class SafeVLMInference:
    """A model, its tokenizer and image settings, a prompt builder and a `Decoder`:
    `from_checkpoint(dir)`, then `answer([Request, ...])` -> one `Result` per request.

    template: a `ConversationTemplate` or its name (`from_checkpoint`: the checkpoint's own
    unless given); prompt_format: "llava" (LLaVA's `tokenizer_image_token` ids, what LLaVA-1.5
    was trained on) or "hf" (the ids HF's `LlavaProcessor` gives the same text).
    """

    def __init__(self, model, tokenizer, images: ImageConfig, *, template: ConversationTemplate | str = "v1",
                 hints: HintConfig = HintConfig(), policy: RiskPolicy = RiskPolicy(),
                 max_length: int | None = None, prompt_format: str = "llava"):
        check_matches_model(tokenizer, model.config)
        self.model, self.tokenizer, self.images, self.hints = model, tokenizer, images, hints
        self.policy = policy
        self.builders = {safety: PromptBuilder(tokenizer, model.num_image_tokens(safety), template, hints,
                                               prompt_format)
                         for safety in (True, False)}
        self.decoder = Decoder(model, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                               max_length=max_length)

    @classmethod
    def from_checkpoint(cls, directory: str, *, template: ConversationTemplate | str | None = None,
                        **kw) -> "SafeVLMInference":
        """`template`: None = the one the checkpoint records (`checkpoint.format.load_template`)."""
        import transformers

        from safevlm_jax.checkpoint.format import load_checkpoint, load_template

        config, model = load_checkpoint(directory)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        return cls(model, tokenizer, image_config(directory, config),
                   template=load_template(directory) if template is None else template, **kw)

    def answer(self, requests: Sequence[Request], *, max_new_tokens: int = 128, sampler=Greedy(),
               seed: int = 0, safety: bool = True,
               on_verdicts: Callable[[list[Verdict | None]], None] | None = None,
               on_text: Callable[[int, str], None] | None = None) -> list[Result]:
        """Answers a batch. `on_verdicts(verdicts)` is called once the verdicts are known
        (before generation); `on_text(row, text)` receives each row's answer as it grows."""
        if safety and not self.model.has_safety:
            raise ValueError("this checkpoint has no safety modules; run with safety off")
        start = time.perf_counter()
        pixels = np.stack([load_image(r.image, self.images) for r in requests])
        builder = self.builders[safety]
        first = builder.build("")[0]  # the verdict reads only the first token (BOS)
        features, level, kind = self.decoder.encode(pixels, [first] * len(requests), safety)
        n = len(requests)
        verdicts = self.policy.verdicts(level, kind, self.hints) if safety else [None] * n
        encode_s = time.perf_counter() - start
        if on_verdicts:
            on_verdicts(verdicts)

        def generate(rows: list[int]) -> list[Result]:  # only rows the policy does not block
            prompts = [builder.build(requests[i].prompt, verdicts[i] and verdicts[i].hint) for i in rows]
            stream = (_Stream(self.tokenizer, lambda r, text: on_text(rows[r], text), len(rows))
                      if on_text else None)
            gen = self.decoder.generate(prompts, features[rows], max_new_tokens=max_new_tokens,
                                        sampler=sampler, seed=seed, use_safety=safety,
                                        on_token=stream, timed=True)
            decode_s = gen.total_s - gen.prefill_s
            steps = max(len(t) for t in gen.tokens)
            timings = {"encode_s": encode_s, "prefill_s": gen.prefill_s, "decode_s": decode_s,
                       "tokens_per_s": (steps - 1) * len(rows) / decode_s if decode_s > 0 else 0.0}
            return [Result(self._text(t), t, verdicts[i], timings, prompt)
                    for i, t, prompt in zip(rows, gen.tokens, prompts)]

        if not safety:
            return generate(list(range(n)))
        outputs = apply_policy(verdicts, generate, self.policy)
        blocked = {"encode_s": encode_s, "prefill_s": 0.0, "decode_s": 0.0, "tokens_per_s": 0.0}
        for i, out in enumerate(outputs):
            if on_text and not isinstance(out, Result):  # a blocked row: the refusal is its text
                on_text(i, out)
        return [out if isinstance(out, Result) else Result(out, [], verdicts[i], blocked)
                for i, out in enumerate(outputs)]

    def _text(self, ids: list[int]) -> str:
        if ids and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class _Stream:
    """Turns each step's tokens [B] into new text per row (`Detokenizer` per row; finished
    rows give EOS, then padding, and are skipped)."""

    def __init__(self, tokenizer, on_text: Callable[[int, str], None], rows: int):
        self.eos, self.on_text = tokenizer.eos_token_id, on_text
        self.rows = [Detokenizer(tokenizer) for _ in range(rows)]
        self.done = [False] * rows

    def __call__(self, tokens: np.ndarray) -> None:
        for row, tok in enumerate(tokens.tolist()):
            if self.done[row]:
                continue
            if tok == self.eos:
                self.done[row] = True
                delta = self.rows[row].flush()
            else:
                delta = self.rows[row].push(tok)
            if delta:
                self.on_text(row, delta)
