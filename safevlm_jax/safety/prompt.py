"""Generation prompts as token ids, with the conditional safety hint inserted by the program.

    ids = PromptBuilder(tokenizer, num_image_tokens).build(question, verdict.hint)

The hint goes into the user turn after the question, introduced by `Safe Hint:`, before
`ASSISTANT:`. It is decided by the verdict and inserted as token ids: user text is tokenized
on its own as plain text (`split_special_tokens=True`), so typing `Safe Hint: ...`, `<image>`
or `</s>` gives ordinary tokens and never changes the verdict, the hint or the image positions.
"""

from __future__ import annotations

from typing import Sequence

from safevlm_jax.data.records import HUMAN, Turn
from safevlm_jax.data.template import TextEncoder
from safevlm_jax.safety.hints import HintConfig

TEMPLATES = {"llava_v1": "v1", "psa": "psa"}  # our names -> `safevlm_jax.data.template` names


class PromptBuilder:
    """Generation prompts as token ids for a template (`llava_v1` or `psa`):

      llava_v1: <s>{system} USER: [IMG]\\n{question}[ Safe Hint: {hint}] ASSISTANT:
      psa:      <s>[IMG]\\n{system} USER: {question}[ Safe Hint: {hint}] ASSISTANT:

    [IMG] = `num_image_tokens` image ids. The text after the image is one chunk, tokenized as
    the data pipeline (`TextEncoder`) and LLaVA tokenize it: without a hint the ids equal
    `TextEncoder.encode_prompt`. A hint's ids are inserted by the program between the
    question's ids and the tail's, each taken as the tokenizer splits them inside the chunk,
    so SentencePiece-style tokenizers (LLaMA's) add no word-start marker at the seams.
    """

    def __init__(self, tokenizer, num_image_tokens: int, template: str = "llava_v1",
                 hints: HintConfig = HintConfig()):
        if template not in TEMPLATES:
            raise ValueError(f"unknown prompt template {template!r}; known: {sorted(TEMPLATES)}")
        self.encoder = TextEncoder(tokenizer, num_image_tokens, max_len=1 << 30,
                                   template=TEMPLATES[template])
        self.tokenizer, self.hints = tokenizer, hints
        t = self.encoder.template
        image = [self.encoder.image_token_id] * num_image_tokens
        if t.image_position == "first_user_turn":
            self._head = self.encoder.bos_ids + self._plain(f"{t.system}{t.sep}{t.roles[0]}: ") + image
            self._question = "\n{}"  # the chunk after the image
        else:
            self._head = self.encoder.bos_ids + image
            self._question = f"\n{t.system}{t.sep}{t.roles[0]}: {{}}"
        self._tail = f"{t.sep}{t.roles[1]}:"

    def build(self, question: str, hint: str | None = None) -> list[int]:
        """Token ids of the prompt; `question` is untrusted plain text, `hint` ours."""
        asked = self._question.format(question)
        if hint is None:
            return self._head + self._plain(asked + self._tail)
        hint_text = f"{self.encoder.template.sep}{self.hints.prefix} {hint}"
        return self._head + self._joined([asked, hint_text, self._tail])

    def reference(self, question: str) -> list[int]:
        """The data pipeline's prompt for `question` (no hint), for checks."""
        return self.encoder.encode_prompt([Turn(HUMAN, question)]).tolist()

    def _joined(self, pieces: Sequence[str]) -> list[int]:
        """The pieces' ids one after the other, each as the tokenizer splits it right after
        the text before it: what the text up to its end has past the text up to its start.
        If the two share a token at the seam (user text ending in spaces, say), the piece is
        tokenized on its own, so the ids before it stay as they are."""
        ids, text, before = [], "", []
        for piece in pieces:
            text += piece
            upto = self._plain(text)
            ids += upto[len(before):] if upto[:len(before)] == before else self._plain(piece)
            before = upto
        return ids

    def _plain(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        bad = self.encoder.forbidden_ids.intersection(ids)
        if bad:
            raise ValueError(f"tokenizer turned plain text into special ids {sorted(bad)}: {text!r}")
        return list(ids)
