"""Clients nobody here wrote, against a real uvicorn server over the demo model: the `openai`
client, LangChain's ChatOpenAI and litellm, with what they send by habit: system messages and
history, stop, n, seed, logprobs, penalties and structured output (`response_format`)."""

import json
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price list

import jsonschema  # noqa: E402
import litellm  # noqa: E402
import openai  # noqa: E402
import pytest  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from serve_helpers import example_url, live_server

QUESTION = "What is shown in this image?"
SCHEMA = {"type": "object", "properties": {
    "shape": {"type": "string", "enum": ["circle", "square", "triangle"]},
    "letter": {"type": "string", "maxLength": 3},
    "count": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["shape", "letter", "count"], "additionalProperties": False}


class Shape(BaseModel):
    shape: str = Field(pattern="^(circle|square|triangle)$")
    letter: str = Field(max_length=3)


@pytest.fixture(scope="module")
def server(demo_engine):
    with live_server(demo_engine) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def image_turn(text=QUESTION, name="clean"):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": example_url(name)}},
                                        {"type": "text", "text": text}]}


def ask(client, messages, **kw):
    return client.chat.completions.create(model="demo", messages=messages, **{"max_tokens": 12, "temperature": 0,
                                                                                 **kw})


def test_openai_system_message_and_history_get_an_answer_with_the_verdict(client):
    messages = [{"role": "system", "content": "You are terse."}, image_turn(),
                {"role": "assistant", "content": "A green circle."}, {"role": "user", "content": "Which letter?"}]
    answer = ask(client, messages)
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].model_extra["safety"]["risk_level"] == 0
    plain = ask(client, messages[1:])
    assert answer.usage.prompt_tokens != plain.usage.prompt_tokens  # its own system text


def test_openai_stop_ends_before_the_stop_string_streamed_or_not(client):
    full = ask(client, [image_turn()], max_tokens=24).choices[0].message.content
    cut = full.find("circle")
    assert cut > 0, full
    stopped = ask(client, [image_turn()], max_tokens=24, stop=["circle", "@@"])
    assert stopped.choices[0].message.content == full[:cut] and stopped.choices[0].finish_reason == "stop"
    streamed = ask(client, [image_turn()], max_tokens=24, stop="circle", stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_n_choices_share_one_prefill_and_each_equals_its_own_seed(client, demo_engine):
    before = demo_engine.stats()
    three = ask(client, [image_turn("Describe the picture.")], n=3, temperature=2.0, seed=40, max_tokens=10)
    after = demo_engine.stats()
    assert [c.index for c in three.choices] == [0, 1, 2]
    prompt = three.usage.prompt_tokens
    prefilled, reused = (after.prefill_tokens - before.prefill_tokens, after.reused_tokens - before.reused_tokens)
    # the first choice prefills the prompt but its last token (the part no earlier request left), the
    # two others copy that whole prefix: each row's step reads the last token
    assert prefilled + reused == 3 * (prompt - 1) and reused >= 2 * (prompt - 1)
    for i, c in enumerate(three.choices):
        alone = ask(client, [image_turn("Describe the picture.")], n=1, temperature=2.0, seed=40 + i,
                    max_tokens=10, logprobs=True)  # logprobs: the first token from the step, as the choices
        assert c.message.content == alone.choices[0].message.content
    assert len({c.message.content for c in three.choices}) > 1


def test_openai_n_choices_stream_each_to_its_end_with_the_usage_of_all(client):
    kw = dict(n=2, temperature=2.0, seed=7, max_tokens=8)
    whole = ask(client, [image_turn()], **kw)
    chunks = [c for c in ask(client, [image_turn()], stream=True, stream_options={"include_usage": True}, **kw)]
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(ch.delta.content or "" for ch in mine) == whole.choices[i].message.content
        assert mine[-1].finish_reason == whole.choices[i].finish_reason and mine[0].model_extra["safety"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_logprobs_in_openais_shape_streamed_too(client):
    answer = ask(client, [image_turn()], logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for t in content:  # greedy: the chosen token is the most likely
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0
        assert bytes(t.bytes).decode() == t.token
    streamed = [c for c in ask(client, [image_turn()], logprobs=True, top_logprobs=3, stream=True) if c.choices]
    tokens = [t.token for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]
    plain = ask(client, [image_turn()])
    assert plain.choices[0].message.content == answer.choices[0].message.content


def test_openai_penalties_are_accepted_and_bounded(client):
    answer = ask(client, [image_turn()], presence_penalty=1.5, frequency_penalty=2.0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        ask(client, [image_turn()], frequency_penalty=2.5)


def test_openai_json_schema_answers_parse_and_validate_greedy_and_sampled(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA, "strict": True}}
    stopped = 0
    for seed in range(20):
        answer = ask(client, [image_turn(name=("clean", "risky")[seed % 2])], response_format=fmt, max_tokens=40,
                     temperature=0 if seed < 4 else 1.0, seed=seed)
        choice = answer.choices[0]
        text = choice.message.content
        assert text.startswith("{"), text
        if choice.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(text), SCHEMA)
    assert stopped >= 15
    obj = ask(client, [image_turn()], response_format={"type": "json_object"}, max_tokens=40, temperature=0)
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_openai_invalid_schema_is_a_400_naming_the_problem(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"$ref": "#/definitions/missing"}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [image_turn()], response_format=fmt)
    assert e.value.body["param"] == "response_format" and "missing" in e.value.body["message"]


def test_langchain_system_history_stop_and_structured_output(server):
    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model="demo", max_tokens=12, temperature=0,
                     max_retries=0, timeout=120)
    image = {"type": "image_url", "image_url": {"url": example_url("clean")}}
    history = [SystemMessage("You are terse."), HumanMessage(content=[image, {"type": "text", "text": QUESTION}]),
               AIMessage("A green circle."), HumanMessage("Which letter is on it?")]
    reply = llm.invoke(history)
    assert isinstance(reply, AIMessage) and reply.content
    full = llm.invoke(history[1:2], max_tokens=24).content
    assert llm.invoke(history[1:2], max_tokens=24, stop=["circle"]).content == full[:full.find("circle")]
    structured = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model="demo", max_tokens=40,
                            temperature=0, max_retries=0, timeout=120).with_structured_output(Shape,
                                                                                            method="json_schema")
    shape = structured.invoke(history[1:2])
    assert isinstance(shape, Shape) and shape.shape in ("circle", "square", "triangle")


def test_litellm_completion_with_history_and_stop_streamed_or_not(server):
    kw = dict(model="openai/demo", api_base=f"{server.url}/v1", api_key="unused", max_tokens=24, temperature=0)
    messages = [{"role": "system", "content": "You are terse."}, image_turn()]
    full = litellm.completion(messages=messages, **kw).choices[0].message.content
    cut = full.find("circle")
    stopped = litellm.completion(messages=messages, stop=["circle"], **kw)
    assert stopped.choices[0].message.content == full[:cut] and stopped.choices[0].finish_reason == "stop"
    chunks = litellm.completion(messages=messages, stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
