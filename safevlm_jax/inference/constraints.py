"""Constrained decoding (OpenAI's `response_format`): a grammar per request, compiled on the
host by llguidance, gives each step a token mask that the jitted step applies
(`logits.apply_mask`), so a constrained answer can only be text the grammar accepts.

    grammars = Grammars(tokenizer, vocab_size)            # the tokenizer's tables, once
    grammar = grammars.compile(json_schema)               # BadRequest naming the problem
    row = grammars.matcher(grammar)                       # one request's state
    row.fill(bitmask[i]); ...; row.consume(token)         # before / after each step

The mask has one bit per token (llguidance's layout, [ceil(V / 32)] int32 per row); EOS is
allowed exactly where the grammar accepts. A step with a mask is a program variant of its own
(`programs.step_program`), run only while a constrained row decodes.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from safevlm_jax.inference.errors import BadRequest

ANY_OBJECT = {"type": "object"}  # json_object: any JSON object
# JSON as json.dumps writes it: no free whitespace, which a small model would repeat forever
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """llguidance's view of one tokenizer (built on first use: about a second), for a model of
    `vocab_size` logits (ids past the tokenizer's are never allowed)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.words = (vocab_size + 31) // 32  # int32 words of a row's mask
        self._ll, self._lock = None, threading.Lock()

    @property
    def ll(self):
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
        return self._ll

    def compile(self, schema: Any, param: str = "response_format") -> str:
        """A JSON schema (a dict) -> llguidance's grammar; BadRequest naming what is wrong."""
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
        except (TypeError, ValueError) as e:
            raise BadRequest(f"{param}: not a JSON schema: {e}", param) from None
        error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll)
        if error:
            raise BadRequest(f"{param}: the schema cannot be used: {messages[0][:500]}", param)
        return grammar

    def matcher(self, grammar: str) -> "RowGrammar":
        return RowGrammar(self, grammar)


class RowGrammar:
    """One request's grammar state: `fill` its next mask, `consume` the token it got."""

    def __init__(self, grammars: Grammars, grammar: str):
        import llguidance

        self.matcher = llguidance.LLMatcher(grammars.ll, grammar, log_level=0)
        if self.matcher.is_error():
            raise BadRequest(f"response_format: {self.matcher.get_error()[:500]}", "response_format")

    def fill(self, row: np.ndarray) -> None:
        """Its next token mask into `row` [ceil(V / 32)] int32 (C-contiguous)."""
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"the grammar refused token {token}: {self.matcher.get_error()[:200]}")

    def accepting(self) -> bool:
        return self.matcher.is_accepting()
