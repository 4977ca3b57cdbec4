"""Streaming text: the deltas of `Detokenizer` add up to the whole answer's decode, with the
real LLaMA tokenizer (word-start pieces, byte fallback for multi-byte characters)."""

import pytest

from safevlm_jax.inference.detokenize import Detokenizer
from tokenizer_helpers import llava_tokenizer

TEXTS = ["The image shows a blue cross with the letter F.", "Ünïcödé — 漢字 and emoji 🙂 mixed in.",
         "  leading spaces, new\nlines\n\nand   runs of spaces"]


@pytest.mark.parametrize("layout", ["non_legacy", "legacy"])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_whole_decode_and_never_split_a_character(layout, text):
    tok = llava_tokenizer(layout)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok)
    deltas = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in x for x in deltas)
