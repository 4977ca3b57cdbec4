"""Generation prompts as token ids, with the conditional safety hint inserted by the program.

    ids = PromptBuilder(tokenizer, num_image_tokens, template).build(question, verdict.hint)

The hint goes into the user turn after the question, introduced by `Safe Hint:`, as the
template's `hinted_turn` writes it (v1: `... USER: [IMG]\\n{question} Safe Hint: {hint}
ASSISTANT:`; psa: the authors' own string). It is decided by the verdict and written by the
program; the question is plain text (`data.specials`), so typing `Safe Hint: ...`, `<image>` or
`</s>` gives ordinary tokens and never changes the verdict, the hint or the image positions.
The ids are exactly the ones the data pipeline (`TextEncoder.encode_prompt`) and LLaVA's
`tokenizer_image_token` give the same text (`prompt_format="llava"`), or HF's
`LlavaProcessor` (`prompt_format="hf"`).
"""

from __future__ import annotations

from safevlm_jax.data.records import HUMAN, Turn
from safevlm_jax.data.template import ALIASES, TEMPLATES as _TEMPLATES, ConversationTemplate, TextEncoder
from safevlm_jax.safety.hints import HintConfig

TEMPLATES = tuple(sorted({*_TEMPLATES, *ALIASES}))  # the names a `--template` flag accepts


class PromptBuilder:
    """Generation prompts as token ids for a template (a `ConversationTemplate` or its name)
    and prompt format ("llava" or "hf"); [IMG] = `num_image_tokens` image ids."""

    def __init__(self, tokenizer, num_image_tokens: int, template: ConversationTemplate | str = "v1",
                 hints: HintConfig = HintConfig(), prompt_format: str = "llava"):
        self.encoder = TextEncoder(tokenizer, num_image_tokens, max_len=1 << 30, template=template,
                                   prompt_format=prompt_format)
        self.tokenizer, self.hints = tokenizer, hints

    @property
    def template(self) -> ConversationTemplate:
        return self.encoder.template

    def build(self, question: str, hint: str | None = None) -> list[int]:
        """Token ids of the prompt; `question` is untrusted plain text, `hint` ours (the hint
        config's prefix goes in front of it)."""
        hinted = None if hint is None else f"{self.hints.prefix} {hint}"
        return self.encoder.encode_prompt([Turn(HUMAN, question)], hint=hinted).tolist()
