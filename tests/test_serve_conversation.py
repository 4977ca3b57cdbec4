"""Chat bodies with system/developer messages and history become the conversation the
template writes (`serve.schemas.parse_chat`): no server, no model."""

import pytest

from safevlm_jax.data.records import GPT, HUMAN, Turn
from safevlm_jax.serve.errors import APIError
from safevlm_jax.serve.schemas import Limits, parse_chat

LIMITS = Limits(vocab_size=32064, max_prompt_chars=10_000)
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def parse(*messages, **kw):
    return parse_chat({"messages": list(messages), **kw}, LIMITS)


def error(*messages) -> dict:
    with pytest.raises(APIError) as e:
        parse(*messages)
    return e.value.body()["error"]


def test_system_and_developer_texts_join_into_the_system_text_and_turns_alternate():
    chat = parse({"role": "system", "content": "Be brief."},
                 {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                 {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bonjour."},
                 {"role": "user", "content": [{"type": "text", "text": "What is it?"}, IMAGE]})
    assert chat.system == "Be brief.\nAnswer in French."
    assert chat.turns == (Turn(HUMAN, "Hi"), Turn(GPT, "Bonjour."), Turn(HUMAN, "What is it?"))
    assert chat.image is not None and chat.image_turn == 2 and chat.image.param == "messages[4].content[1].image_url.url"


def test_consecutive_messages_of_one_role_are_one_turn_and_no_system_is_none():
    chat = parse({"role": "user", "content": [IMAGE]}, {"role": "user", "content": "first"},
                 {"role": "user", "content": "second"})
    assert chat.system is None and chat.turns == (Turn(HUMAN, "first\nsecond"),) and chat.image_turn == 0


@pytest.mark.parametrize("messages,param", [
    (({"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hi"}), "messages"),
    (({"role": "system", "content": "x"},), "messages"),
    (({"role": "user", "content": "Hi"}, {"role": "function", "content": "x"}), "messages[1].role"),
])
def test_conversations_the_template_cannot_hold_are_refused_by_name(messages, param):
    e = error(*messages)
    assert e["code"] == "unsupported_conversation" and e["param"] == param


def test_an_image_in_a_system_or_assistant_message_is_refused_and_the_text_bound_counts_every_message():
    e = error({"role": "system", "content": [IMAGE]}, {"role": "user", "content": "Hi"})
    assert e["param"].startswith("messages[0].content[0]")
    long = "x" * 6000
    e = error({"role": "system", "content": long}, {"role": "user", "content": long})
    assert e["code"] == "context_length_exceeded" and e["param"] == "messages[0].content"
