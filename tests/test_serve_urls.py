"""The served surface a real client reaches, against a real uvicorn server: image URLs fetched
from a local HTTP server (the `openai` client), `models.retrieve` with --served_model_name
aliases, CORS preflights (httpx), OpenAI's moderation category names, the access log."""

from __future__ import annotations

import logging
import threading
import time

import httpx
import openai
import pytest

from safevlm_jax.serve.fetch import FetchPolicy
from tests.media_server import media_server
from tests.serve_helpers import QUESTION, chat_body, example_url, live_server

ORIGIN = "http://app.example"
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def media():
    with media_server() as url:
        yield url


@pytest.fixture(scope="module")
def server(demo_engine):
    with live_server(demo_engine, model_aliases=("llava", "org/llava-1.5"), cors_origins=(ORIGIN,),
                     media=FetchPolicy(("localhost",), allow_private=True, timeout_s=TIMEOUT_S)) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, image: str, model: str = "demo", **kw):
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": QUESTION}]
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=16, temperature=0, **kw)


def test_openai_image_url_answers_as_the_same_image_sent_inline(client, media):
    fetched = ask(client, f"{media}/image.png").choices[0]
    inline = ask(client, example_url("clean")).choices[0]
    assert fetched.message.content == inline.message.content
    assert fetched.model_extra["safety"] == inline.model_extra["safety"]
    assert fetched.message.content and not fetched.message.content[0].isspace()  # no leading space
    streamed = ask(client, f"{media}/same_host", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == inline.message.content


@pytest.mark.parametrize("path, code", [
    ("/other_host", "image_url_redirect"), ("/missing", "image_url_http_error"), ("/page", "image_url_not_image"),
    ("/huge", "image_url_too_large"), ("/slow", "image_url_timeout"), ("/garbage", "unsupported_image_format"),
])
def test_each_bad_image_url_is_one_json_400_naming_the_part(server, media, path, code):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(f"{media}{path}", max_tokens=4),
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["param"] == "messages[0].content[0].image_url.url"


def test_slow_image_urls_stall_neither_the_loop_nor_other_requests_images(server, media):
    """As many trickling downloads as there are input workers: /health answers at once and an
    inline image is decoded and judged while they all still wait."""
    slow = [threading.Thread(target=httpx.post, args=(f"{server.url}/v1/chat/completions",),
                             kwargs={"json": chat_body(f"{media}/slow"), "timeout": 30}) for _ in range(4)]
    for thread in slow:
        thread.start()
    time.sleep(0.2)
    for _ in range(5):
        start = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert time.monotonic() - start < 0.5
    moderation = httpx.post(f"{server.url}/v1/moderations", timeout=30, json={
        "input": [{"type": "image_url", "image_url": {"url": example_url("low_risk")}}]})
    assert moderation.status_code == 200 and all(thread.is_alive() for thread in slow)
    for thread in slow:
        thread.join()


def test_models_retrieve_reports_the_first_name_and_accepts_every_alias(client):
    assert client.models.retrieve("demo").id == "demo"
    assert client.models.retrieve("org/llava-1.5").id == "org/llava-1.5"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"
    assert [m.id for m in client.models.list().data] == ["demo"]
    answer = ask(client, example_url("clean"), model="llava")
    assert answer.model == "demo" and answer.choices[0].message.content


def test_cors_preflight_allows_the_configured_origin_only(server):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(f"{server.url}/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{server.url}/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    models = httpx.get(f"{server.url}/v1/models", headers={"Origin": ORIGIN})
    assert models.headers["access-control-allow-origin"] == ORIGIN
    error = httpx.get(f"{server.url}/v1/models/nope", headers={"Origin": ORIGIN})
    assert error.status_code == 404 and error.headers["access-control-allow-origin"] == ORIGIN


def test_moderation_of_an_image_url_carries_openai_category_names(client, media):
    [result] = client.moderations.create(model="demo", input=[
        {"type": "image_url", "image_url": {"url": f"{media}/image.png"}}]).results
    ours = result.categories.model_extra
    assert (result.categories.illicit, result.categories.harassment, result.categories.hate) == \
        (ours["illegal_risk"], ours["insults_and_bullying"], ours["fairness"])
    assert result.category_scores.hate == result.category_scores.model_extra["fairness"]
    [risky] = client.moderations.create(input=[
        {"type": "image_url", "image_url": {"url": example_url("risky")}}]).results
    scores = risky.category_scores
    assert (scores.illicit, scores.harassment, scores.hate) == tuple(
        scores.model_extra[c] for c in ("illegal_risk", "insults_and_bullying", "fairness"))
    assert risky.flagged and any(risky.categories.model_extra.values())


def test_access_log_has_one_line_per_answer_and_prompts_only_when_allowed(demo_engine, server, caplog):
    secret = "What is the secret word in this picture?"
    with caplog.at_level(logging.INFO, logger="safevlm_jax.serve.access"):
        httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(example_url("clean"), secret, max_tokens=4),
                   timeout=120)
        httpx.get(f"{server.url}/v1/models/nope")
        with live_server(demo_engine, log_prompts=True) as logging_server:
            httpx.post(f"{logging_server.url}/v1/chat/completions",
                       json=chat_body(example_url("clean"), secret, max_tokens=4), timeout=120)
    lines = [r.getMessage() for r in caplog.records if r.name == "safevlm_jax.serve.access"]
    assert len(lines) == 3, lines
    chat, missing, logged = lines
    assert chat.startswith("127.0.0.1 POST /v1/chat/completions 200 ") and " tokens=" in chat
    prompt, completion = map(int, chat.split("tokens=")[1].split()[0].split("+"))
    assert prompt > 0 and 0 < completion <= 4
    assert secret not in chat and secret not in missing and missing.startswith("127.0.0.1 GET /v1/models/nope 404 ")
    assert secret in logged
