"""The official `openai` client against a real server on 127.0.0.1: chat, streaming, moderation."""

from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest

from safevlm_jax.safety.taxonomy import RISK_TYPES
from tests.serve_helpers import QUESTION, chat_body, example_url


@pytest.fixture(scope="module")
def server(demo_api):
    return demo_api


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, image: str, **kw):
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": QUESTION}]
    return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}],
                                          max_tokens=48, temperature=0, **kw)


def test_openai_chat_answer_carries_the_verdict_and_follows_it(client):
    risky = ask(client, example_url("risky"))
    choice = risky.choices[0]
    safety = choice.model_extra["safety"]
    assert (safety["risk_level"], safety["risk_level_name"], safety["action"]) == (3, "high", "refuse")
    assert safety["hint_applied"] and not safety["fail_closed"]
    assert len(safety["risk_level_probs"]) == 4 and len(safety["risk_type_probs"]) == 7
    assert np.isclose(sum(safety["risk_level_probs"]), 1) and np.argmax(safety["risk_level_probs"]) == 3
    assert safety["risk_type"] == np.argmax(safety["risk_type_probs"]) != 6  # a risky type, not clean
    assert safety["risk_type_name"] == RISK_TYPES[safety["risk_type"]]
    assert choice.message.role == "assistant" and choice.message.content.strip().startswith("I'm sorry")
    assert choice.finish_reason == "stop"
    assert risky.usage.prompt_tokens > 0 and 0 < risky.usage.completion_tokens <= 48
    assert risky.usage.total_tokens == risky.usage.prompt_tokens + risky.usage.completion_tokens

    clean = ask(client, example_url("clean")).choices[0]
    assert (clean.model_extra["safety"]["risk_level"], clean.model_extra["safety"]["action"]) == (0, "none")
    assert not clean.model_extra["safety"]["hint_applied"]
    assert clean.message.content.strip() and not clean.message.content.strip().startswith("I'm sorry")


def test_openai_stream_first_chunk_has_the_verdict_and_the_text_equals_the_whole_answer(client):
    whole = ask(client, example_url("medium_risk")).choices[0].message.content
    chunks = list(ask(client, example_url("medium_risk"), stream=True, stream_options={"include_usage": True}))
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant"
    assert first.model_extra["safety"]["risk_level"] == 2 and first.model_extra["safety"]["hint_applied"]
    assert all("safety" not in c.choices[0].model_extra for c in chunks[1:] if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_stream_is_openai_server_sent_events_ending_with_done(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120,
                      json=chat_body(example_url("clean"), max_tokens=16, stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert [json.loads(e[6:])["object"] for e in events[:-1]] == ["chat.completion.chunk"] * (len(events) - 1)


def test_safety_off_is_plain_llava_without_verdict_or_hint(client):
    off = ask(client, example_url("risky"), extra_body={"safety": False}).choices[0]
    assert off.model_extra["safety"] is None
    assert off.message.content.strip() and not off.message.content.strip().startswith("I'm sorry")


def test_openai_moderation_flags_the_risky_image_under_its_type(client):
    risky = client.moderations.create(model="demo", input=[
        {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": example_url("risky")}}])
    [result] = risky.results
    assert result.flagged
    # ours are extra fields beside the client's own (None) categories
    flags, scores = result.categories.model_extra, result.category_scores.model_extra
    [verdict] = result.model_extra["safety"]
    category = verdict["risk_type_name"].replace(" ", "_")
    assert {c for c, hit in flags.items() if hit} == {category}
    assert (result.model_extra["risk_level"], result.model_extra["risk_level_name"]) == (3, "high")
    expected = verdict["risk_type_probs"][verdict["risk_type"]] * (1 - verdict["risk_level_probs"][0])
    assert scores[category] == pytest.approx(expected) == max(scores.values())
    assert set(flags) == {"politics", "illegal_risk", "insults_and_bullying", "fairness", "privacy", "misleading"}

    chat = ask(client, example_url("risky")).choices[0].model_extra["safety"]
    np.testing.assert_allclose(verdict["risk_level_probs"], chat["risk_level_probs"], atol=1e-5)

    clean = client.moderations.create(model="demo", input=[
        {"type": "image_url", "image_url": {"url": example_url("clean")}}]).results[0]
    assert not clean.flagged and not any(clean.categories.model_extra.values())
    assert clean.model_extra["risk_level"] == 0


def test_models_health_and_metrics_report_what_was_served(client, server):
    assert [m.id for m in client.models.list().data] == ["demo"]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and {"queue_depth", "active_slots"} <= set(health)
    metrics = httpx.get(f"{server.url}/metrics").text
    risky = ask(client, example_url("risky")).choices[0].model_extra["safety"]["risk_type_name"]
    for line in ('safevlm_requests_total{endpoint="chat",status="200"}',
                 f'safevlm_verdicts_total{{level="high",type="{risky}"}}',
                 'safevlm_finish_reasons_total{reason="stop"}',
                 "safevlm_time_to_first_token_seconds_count", "safevlm_queue_depth",
                 "safevlm_active_slots", "safevlm_tokens_per_second", "safevlm_generated_tokens_total"):
        assert line in metrics, line


def test_the_page_and_its_script_are_served_without_external_resources(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and 'src="/static/app.js"' in page.text
    script = httpx.get(f"{server.url}/static/app.js")
    assert script.status_code == 200 and "/v1/chat/completions" in script.text
    for text in (page.text, script.text, httpx.get(f"{server.url}/static/style.css").text):
        assert "http://" not in text and "https://" not in text
