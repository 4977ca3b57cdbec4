"""An answer's text starts with its first word: the word-start space of the first piece is
dropped as SentencePiece drops it (the demo's byte-level BPE keeps it), while the ids stay as the
model produced them and the streamed deltas still add up to the whole text."""

import pytest
from transformers import AutoTokenizer

from safevlm_jax.checkpoint.demo import DEMO_DIR
from safevlm_jax.inference.detokenize import Detokenizer, decode, keeps_leading_space
from tokenizer_helpers import llava_tokenizer

ANSWERS = [" I'm sorry, but I can't help with that.", " The image shows a cross.", "  two spaces",
           " Ünïcödé 漢字 🙂"]


@pytest.fixture(scope="module")
def demo_tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_DIR)


def deltas(tokenizer, ids):
    d = Detokenizer(tokenizer)
    return [d.push(i) for i in ids] + [d.flush()]


@pytest.mark.parametrize("answer", ANSWERS)
def test_byte_level_answer_drops_exactly_the_first_word_start_space(demo_tokenizer, answer):
    ids = demo_tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert keeps_leading_space(demo_tokenizer)
    assert demo_tokenizer.decode(ids).startswith(" ")  # what the tokenizer alone gives
    assert decode(demo_tokenizer, ids) == answer[1:]
    assert "".join(deltas(demo_tokenizer, ids)) == answer[1:]


@pytest.mark.parametrize("layout", ["non_legacy", "legacy"])
@pytest.mark.parametrize("answer", ANSWERS)
def test_sentencepiece_answer_is_the_tokenizers_own_decode(layout, answer):
    tok = llava_tokenizer(layout)
    ids = tok(answer.lstrip(" "), add_special_tokens=False)["input_ids"]
    assert not keeps_leading_space(tok)
    assert decode(tok, ids) == tok.decode(ids, skip_special_tokens=True) == "".join(deltas(tok, ids))
