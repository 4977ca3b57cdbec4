"""The published schema, fuzzed against a real server: schemathesis draws chat and moderation
bodies from `/openapi.json` (ones the schema allows, and ones that break it), half of them
aimed at the engine (a length that fits the context, real and hostile images), while a client
asks the same greedy question again and again. No answer is a 5xx, every request is answered
in time, the steady client always gets its same whole answer, and afterwards the server is
healthy with exact counters. Bounded: a few hundred examples, no shrinking."""

from __future__ import annotations

import io
import threading
import time

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode

from tests.serve_helpers import chat_body, data_url, example_url, live_server, png_bytes

EXAMPLES = {("/v1/chat/completions", GenerationMode.POSITIVE): 150,
            ("/v1/chat/completions", GenerationMode.NEGATIVE): 80,
            ("/v1/moderations", GenerationMode.POSITIVE): 40,
            ("/v1/moderations", GenerationMode.NEGATIVE): 30}


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (9, 90, 200)).save(buf, format="GIF")
    return buf.getvalue()


IMAGE_URLS = [example_url("risky"), data_url(_gif(), "image/gif"), data_url(png_bytes(1500, 12)),
              data_url(png_bytes(2500, 10)),  # beyond the aspect limit
              data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EOF\n"),  # EPS declared as PNG
              "data:image/png;base64,iVBORw0KGgo="]  # a signature, nothing else


@pytest.fixture(scope="module")
def server(demo_engine):
    with live_server(demo_engine, default_max_tokens=8) as s:
        yield s


def _image_refs(body: dict) -> list[dict]:
    """The image_url objects of a chat or moderation body (as generated: any shape)."""
    parts = body.get("input")
    if isinstance(body.get("messages"), list) and body["messages"] and isinstance(body["messages"][0], dict):
        parts = body["messages"][0].get("content")
    return [p["image_url"] for p in parts if isinstance(p, dict) and isinstance(p.get("image_url"), dict)] \
        if isinstance(parts, list) else []


@st.composite
def aimed(draw, cases):
    """A generated case; half of them get a model id served, a length that fits, images that
    decode (or are hostile) and a conversation ending with a user turn, so that they reach the
    image decoder and the engine."""
    case = draw(cases)
    if isinstance(case.body, dict) and draw(st.booleans()):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int):
                case.body[key] = draw(st.integers(1, 12))
        if "model" in case.body:
            case.body["model"] = "demo"
        messages = case.body.get("messages")
        if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
            for i, m in enumerate(messages):  # user turns (after a system one), so the conversation holds
                first_system = i == 0 and len(messages) > 1 and m.get("role") == "system"
                if m.get("role") in ("assistant", "system", "developer") and not first_system:
                    m["role"] = "user"
        for ref in _image_refs(case.body):
            ref["url"] = draw(st.sampled_from(IMAGE_URLS))
    return case


def test_fuzzed_bodies_get_no_5xx_each_one_answer_and_others_are_unaffected(server):
    schema = schemathesis.openapi.from_dict(httpx.get(f"{server.url}/openapi.json").json())
    schema.config.max_stream_events = 100_000  # read every stream to its end (default: 20 events)
    steady = chat_body(example_url("clean"), max_tokens=12)
    want = httpx.post(f"{server.url}/v1/chat/completions", json=steady, timeout=60).json()
    stop, steady_answers, errors = threading.Event(), [], server.engine.stats().finished["error"]

    def steady_client():
        while not stop.is_set():
            r = httpx.post(f"{server.url}/v1/chat/completions", json=steady, timeout=60)
            steady_answers.append((r.status_code, r.json()["choices"][0]["message"]["content"]
                                   if r.status_code == 200 else r.text))

    client = threading.Thread(target=steady_client)
    client.start()
    statuses = {}
    try:
        for (path, mode), n in EXAMPLES.items():
            settings = hypothesis.settings(max_examples=n, deadline=None, database=None, phases=[hypothesis.Phase.generate],
                                           suppress_health_check=list(hypothesis.HealthCheck), print_blob=True)

            @settings
            @hypothesis.given(case=aimed(schema[path]["POST"].as_strategy(generation_mode=mode)))
            def check(case):
                r = case.call(base_url=server.url, timeout=60)  # a request left unanswered times out
                key = r.json()["error"]["code"] if r.status_code == 400 else r.status_code
                statuses[key] = statuses.get(key, 0) + 1
                assert r.status_code < 500, (case.body, r.text[:500])
                assert not r.stream_cut_short, "a stream went silent"
                if r.status_code == 200 and isinstance(case.body, dict) and case.body.get("stream") is True:
                    assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]

            check()
    finally:
        stop.set()
        client.join(timeout=120)
    assert statuses.get(200, 0) >= 20, statuses  # the engine was reached, not only the validators
    assert steady_answers and all(a == (200, want["choices"][0]["message"]["content"]) for a in steady_answers)
    deadline = time.monotonic() + 60
    while (stats := server.engine.stats()).active_slots or stats.queue_depth:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    assert stats.accepted == sum(stats.finished.values()) and stats.finished["error"] == errors
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
