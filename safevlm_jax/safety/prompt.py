"""Generation prompts as token ids, with the conditional safety hint inserted by the program.

    ids = PromptBuilder(tokenizer, num_image_tokens, template).build(question, verdict.hint)
    ids = builder.build(Conversation(turns, system), hint)     # several turns, own system text

The hint goes into the last user turn after the question, introduced by `Safe Hint:`, as the
template's `hinted_turn` writes it (v1: `... USER: [IMG]\\n{question} Safe Hint: {hint}
ASSISTANT:`; psa: the authors' own string), whatever came before. It is decided by the verdict
and written by the program; the question, the earlier turns and the system text are plain
text (`data.specials`), so typing `Safe Hint: ...`, `<image>` or `</s>` gives ordinary tokens
and never changes the verdict, the hint or the image positions.
The ids are exactly the ones the data pipeline (`TextEncoder.encode_prompt`) and LLaVA's
`tokenizer_image_token` give the same text (`prompt_format="llava"`), or HF's
`LlavaProcessor` (`prompt_format="hf"`).
"""

from __future__ import annotations

import dataclasses

from safevlm_jax.data.records import HUMAN, Turn
from safevlm_jax.data.template import ALIASES, TEMPLATES as _TEMPLATES, ConversationTemplate, TextEncoder
from safevlm_jax.safety.hints import HintConfig

TEMPLATES = tuple(sorted({*_TEMPLATES, *ALIASES}))  # the names a `--template` flag accepts


@dataclasses.dataclass(frozen=True)
class Conversation:
    """The text of a generation prompt: turns alternating user (`HUMAN`) and assistant from a
    user turn and ending with one (the question to answer); system: the system text, None for
    the template's own; image_turn: the index of the user turn holding the image (if there is
    one). All of it untrusted plain text."""

    turns: tuple[Turn, ...]
    system: str | None = None
    image_turn: int = 0

    @classmethod
    def of(cls, question: str) -> "Conversation":
        """One question."""
        return cls((Turn(HUMAN, question),))


def query_id(tokenizer) -> int:
    """The safety head's query token: the first token of every prompt (BOS; the verdict reads
    the image and this token's embedding only, docs/safety_modules.md)."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    if not ids:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} adds no BOS, the safety head's query token")
    return ids[0]


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

    def build(self, conversation: Conversation | str, hint: str | None = None, image: bool = True) -> list[int]:
        """Token ids of the prompt for a conversation (or one question), with the image
        positions (`image`) and the hint (ours; the hint config's prefix goes in front of it)."""
        if isinstance(conversation, str):
            conversation = Conversation.of(conversation)
        hinted = None if hint is None else f"{self.hints.prefix} {hint}"
        return self.encoder.encode_prompt(conversation.turns, image, hinted, conversation.system,
                                          conversation.image_turn).tolist()

    @property
    def query_id(self) -> int:
        """The safety head's query token (`query_id`): every prompt built here starts with it."""
        return query_id(self.tokenizer)
