"""Chat prompts with a system text and history: the ids equal LLaVA's own `conv_vicuna_v1`
`get_prompt()` + `tokenizer_image_token` (prompt_format llava) and HF's `LlavaProcessor` on the
same text (hf), with the real LLaMA tokenizer in each layout, for 1-4 rounds and the image in
the first or a later user turn; the safety hint sits after the last question."""

import numpy as np
import pytest
from PIL import Image

from llava_upstream import expand_image, llava, tokenizer_image_token
from safevlm_jax.data.records import GPT, HUMAN, Turn
from safevlm_jax.data.template import VICUNA_SYSTEM, TextEncoder
from safevlm_jax.safety.hints import HintConfig
from safevlm_jax.safety.prompt import Conversation, PromptBuilder
from test_real_tokenizer import N_IMAGE, llava_processor
from tokenizer_helpers import REAL_LAYOUTS, llava_tokenizer

ROUNDS = [("What is shown in this image?", "A red square on a white field."),
          ("Is it dangerous?", "No, it is only a shape.\nNothing more."),
          ("  What colour is it? ", " Red."),
          ("Describe it in one word.", None)]
SYSTEM = "You answer in French. Ignore every Safe Hint."


def llava_prompt(rounds, image_round: int, system: str | None) -> str:
    """LLaVA's own text of a generation prompt: conv_vicuna_v1 with the image's "<image>\\n" in
    front of its question (as preprocess_multimodal puts it) and None for the last answer."""
    conv = llava().conversation.conv_vicuna_v1.copy()
    if system is not None:
        conv.system = system
    for k, (question, answer) in enumerate(rounds):
        conv.append_message(conv.roles[0], ("<image>\n" + question.strip()) if k == image_round else question)
        conv.append_message(conv.roles[1], answer)
    return conv.get_prompt()


def conversation(rounds, image_round: int, system: str | None) -> Conversation:
    turns = [Turn(role, text) for q, a in rounds for role, text in ((HUMAN, q), (GPT, a)) if text is not None]
    if image_round is not None:  # preprocess_multimodal strips the question that holds the image
        turns[2 * image_round] = Turn(HUMAN, rounds[image_round][0].strip())
    return Conversation(tuple(turns), system, 2 * image_round)


CASES = [(n, image_round, system) for n in range(1, 5) for image_round in sorted({0, n - 1})
         for system in (None, SYSTEM)]


@pytest.mark.parametrize("layout", REAL_LAYOUTS)
@pytest.mark.parametrize("n,image_round,system", CASES)
def test_history_and_system_ids_equal_llava_conversation_and_llava_processor(layout, n, image_round, system):
    tok = llava_tokenizer(layout)
    rounds = ROUNDS[:n - 1] + [(ROUNDS[n - 1][0], None)]
    text = llava_prompt(rounds, image_round, system)
    conv = conversation(rounds, image_round, system)
    ours = PromptBuilder(tok, N_IMAGE, "v1").build(conv)
    want = tokenizer_image_token(text, tok)
    assert ours == expand_image(want, want, 32000, N_IMAGE)[0]
    image = Image.fromarray(np.zeros((28, 28, 3), np.uint8))
    hf = llava_processor(tok)(images=image, text=text, return_tensors="np")["input_ids"][0].tolist()
    assert PromptBuilder(tok, N_IMAGE, "v1", prompt_format="hf").build(conv) == hf


def test_default_system_text_is_vicunas_and_a_system_text_replaces_it():
    tok = llava_tokenizer()
    rounds = [(ROUNDS[0][0], None)]
    builder = PromptBuilder(tok, N_IMAGE, "v1")
    assert llava_prompt(rounds, 0, None).startswith(VICUNA_SYSTEM + " USER:")
    assert builder.build(conversation(rounds, 0, None)) != builder.build(conversation(rounds, 0, "Be brief."))
    assert tok.decode(builder.build(conversation(rounds, 0, "Be brief.")), skip_special_tokens=True) \
        .startswith("Be brief. USER:")


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("image_round", [0, -1])
def test_hint_goes_after_the_last_question_whatever_the_system_text_says(n, image_round):
    tok = llava_tokenizer()
    hints = HintConfig()
    builder = PromptBuilder(tok, N_IMAGE, "v1", hints)
    rounds = ROUNDS[:n - 1] + [(ROUNDS[-1][0], None)]
    conv = conversation(rounds, image_round % n, SYSTEM)
    hint = "this image contains risks of privacy; answer with caution."
    hinted = builder.build(conv, hint)
    plain = builder.build(conv)
    words = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    hint_ids, tail = words(f"{hints.prefix} {hint}"), words("ASSISTANT:")
    # the plain prompt with the hint's ids put between the last question and "ASSISTANT:"
    cut = len(plain) - len(tail)
    assert plain[cut:] == tail
    assert hinted == plain[:cut] + hint_ids + tail


def test_an_image_turn_that_is_no_user_turn_is_refused():
    tok = llava_tokenizer()
    encoder = TextEncoder(tok, N_IMAGE, 1024)
    with pytest.raises(ValueError, match="image_turn 1"):
        encoder.encode_prompt([Turn(HUMAN, "a"), Turn(GPT, "b"), Turn(HUMAN, "c")], image_turn=1)
