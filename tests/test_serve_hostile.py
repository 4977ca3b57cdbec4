"""Hostile input cannot hurt the server: a value beyond its bound is a 400 naming the field
(never a crash in the engine's loop), a body or image that would take seconds or gigabytes is
refused or worked on off the event loop, only six image formats are opened, chosen by content,
and one request never fails another: the others' answers and the engine's counters stay exact.
Each class of the attack report has its test here, with other values than the report's."""

from __future__ import annotations

import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from safevlm_jax.data.images import MAX_ASPECT
from safevlm_jax.data.tokenizer import max_prompt_chars
from safevlm_jax.inference.engine import EngineRequest
from safevlm_jax.inference.errors import BadRequest
from tests.serve_helpers import chat_body, data_url, example_url, live_server

MAX_BODY = 24 * 2**20
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\n%%EOF\n"


@pytest.fixture(scope="module")
def server(demo_engine):
    with live_server(demo_engine, max_body_bytes=MAX_BODY) as s:
        yield s


def post(server, body, path="/v1/chat/completions", timeout=60) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{server.url}{path}", content=body, timeout=timeout,
                          headers={"Content-Type": "application/json"})
    return httpx.post(f"{server.url}{path}", json=body, timeout=timeout)


def refused(r: httpx.Response, code: str, param: str | None = "any") -> dict:
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == code, error
    if param != "any":
        assert error["param"] == param, error
    return error


def text_body(**kw) -> dict:
    return chat_body(None, **{"max_tokens": 4, **kw})


def raw_body(fields: str) -> bytes:
    """A chat body as JSON text, `fields` spliced in verbatim (for what json.dumps cannot write)."""
    return ('{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, ' + fields + "}").encode()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def vocab(server) -> int:
    return server.engine.config.text.vocab_size


def prompt_chars(server) -> int:
    """The most characters a prompt can have and still fit the served context."""
    return max_prompt_chars(server.engine.tokenizer, server.engine.max_length)


OUT_OF_BOUNDS = {  # field values the API or the model cannot hold -> the param named
    "top_k_beyond_int32": ({"top_k": 3 * 2**31 + 5}, "top_k"),
    "top_k_beyond_the_vocabulary": (lambda s: {"top_k": vocab(s) + 7}, "top_k"),
    "seed_beyond_int64": ({"seed": 2**64 + 9}, "seed"),
    "seed_below_int64": ({"seed": -(2**63) - 3}, "seed"),
    "max_tokens_beyond_int32": ({"max_tokens": 2**35}, "max_tokens"),
    "temperature_beyond_2": ({"temperature": 9.25}, "temperature"),
    "seventeen_metadata_keys": ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    "model_name_of_300_chars": ({"model": "x" * 300}, "model"),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_BOUNDS))
def test_a_value_beyond_its_bound_is_a_400_naming_the_field(server, case):
    fields, param = OUT_OF_BOUNDS[case]
    fields = fields(server) if callable(fields) else fields
    refused(post(server, text_body(**fields)), "invalid_value", param)


def test_integers_too_long_to_parse_are_400_in_any_field(server):
    for field in ("top_k", "seed", "max_tokens", "temperature"):
        refused(post(server, raw_body(f'"{field}": {"7" * 6001}')), "invalid_json", None)


def test_unpaired_surrogates_are_400_naming_where_paired_ones_are_text(server):
    body = json.dumps(chat_body(None, question="Hi \\udc01 there", max_tokens=4)).replace("\\\\udc01", "\\udc01")
    refused(post(server, body), "invalid_json", "messages[0].content[0].text")
    refused(post(server, raw_body('"user": "\\ud9ff"')), "invalid_json", "user")
    refused(post(server, raw_body('"metadata": {"\\udbff": "v"}')), "invalid_json", "metadata")
    refused(post(server, b'{"input": ["\\ude00"]}', "/v1/moderations"), "invalid_json", "input[0]")
    paired = raw_body('"user": "\\ud83d\\ude42"')  # one character, U+1F642, escaped as a pair
    assert post(server, paired).status_code == 200


def test_the_engine_refuses_at_submit_what_it_cannot_hold(server):
    """Through the Engine's public API too: nothing reaches the loop that could raise there."""
    engine = server.engine
    bad = [dict(top_k=vocab(server) + 1), dict(top_k=np.int64(2**40)), dict(seed=2**70), dict(max_tokens=2**40),
           dict(temperature=10**400), dict(top_p=float("nan")), dict(seed=-(2**64))]
    for fields in bad:
        with pytest.raises(BadRequest):
            engine.submit(EngineRequest(None, "Hi", **fields))
    start = time.perf_counter()
    with pytest.raises(BadRequest, match="characters exceeds the context length"):
        engine.submit(EngineRequest(None, "word " * (prompt_chars(server) // 5 + 1)))
    assert time.perf_counter() - start < 1.0  # refused by its length, not tokenized


def test_a_prompt_longer_than_the_context_could_hold_is_refused_untokenized(server):
    big = "lorem ipsum dolor " * (6 * 2**20 // 18)  # 6 MB: ~1 M tokens at best
    start = time.perf_counter()
    error = refused(post(server, chat_body(None, question=big, max_tokens=4)), "context_length_exceeded",
                    "messages[0].content")
    assert time.perf_counter() - start < 5.0 and "characters" in error["message"]


def test_a_body_with_more_values_than_any_request_holds_is_refused_unparsed(server):
    flood = b'{"messages": [{"role": "user", "content": "Hi"}], "metadata": {"a": "' + b"," * 100 + \
        b'"}, "user": [' + b"0," * (4 * 2**20) + b"0]}"
    start = time.perf_counter()
    refused(post(server, flood), "invalid_body", None)
    assert time.perf_counter() - start < 5.0


def test_health_answers_within_a_second_while_hostile_bodies_are_worked_on(server):
    """Parsing, image decoding and tokenizing run in the worker pool: the event loop keeps
    answering /health (the goal, 200 ms at p99, is measured by benchmarks/serve_hostile.py;
    this bound catches the class: stalls of seconds)."""
    big_image = data_url(encoded(Image.linear_gradient("L").resize((4000, 4000)).convert("RGB"), "PNG"))
    hostile = [chat_body(big_image, max_tokens=2),
               chat_body(None, question="a, " * (7 * 2**20 // 3), max_tokens=2),
               raw_body('"user": [' + "1," * (3 * 2**20) + "1]"),
               chat_body(None, question="Hi " * (prompt_chars(server) // 3 - 8), max_tokens=2)]  # tokenized
    answers, latencies, done = [None] * len(hostile), [], threading.Event()

    def send(i):
        answers[i] = post(server, hostile[i], timeout=120).status_code

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(hostile))]
    for t in threads:
        t.start()
    with httpx.Client(timeout=30) as client:
        while any(t.is_alive() for t in threads):
            start = time.perf_counter()
            assert client.get(f"{server.url}/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
    assert answers == [200, 400, 400, 400] and len(latencies) >= 3
    assert max(latencies) < 1.0, sorted(latencies)[-5:]


def moderate(server, data: bytes, mime: str = "image/png") -> httpx.Response:
    return post(server, {"input": [{"type": "image_url", "image_url": {"url": data_url(data, mime)}}]},
                "/v1/moderations")


def test_only_six_formats_are_opened_chosen_by_content_not_by_the_declared_type(server):
    image = Image.linear_gradient("L").resize((48, 40)).convert("RGB")
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        assert moderate(server, encoded(image, fmt), "image/png").status_code == 200, fmt
    others = {"eps": (EPS, "image/png"), "ico": (encoded(image, "ICO"), "image/png"),
              "pcx": (encoded(image, "PCX"), "image/x-pcx"),
              "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>', "image/svg+xml"),
              "pdf": (b"%PDF-1.7\n%%EOF\n", "image/png")}
    for name, (data, mime) in others.items():
        refused(moderate(server, data, mime), "unsupported_image_format", "input[0].image_url.url")


def test_any_image_shape_within_the_pixel_limit_is_answered_or_refused_by_name(server):
    """LLaVA pads to a square: a thin strip would be a huge square, so long images are shrunk
    first and the aspect ratio is bounded; the chat answers, the server stays up."""
    gradient = Image.linear_gradient("L").convert("RGB")
    strip = gradient.resize((MAX_ASPECT * 60, 60))  # 12 000 x 60: at the limit
    tower = gradient.resize((90, 9000))
    for image in (strip, tower):
        r = post(server, chat_body(data_url(encoded(image, "PNG")), max_tokens=3))
        assert r.status_code == 200 and r.json()["choices"][0]["safety"] is not None
    beyond = gradient.resize((MAX_ASPECT * 20 + 40, 20))
    refused(post(server, chat_body(data_url(encoded(beyond, "PNG")), max_tokens=3)), "aspect_ratio_too_large",
            "messages[0].content[0].image_url.url")


def stream_text(server, body) -> str:
    """A streamed answer's text; asserts it is whole (one finish reason, then [DONE])."""
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert sum(1 for c in chunks if c["choices"][0]["finish_reason"]) == 1
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def test_hostile_requests_among_others_fail_alone_and_the_counters_stay_exact(server):
    names = ["clean", "risky", "low_risk", "medium_risk"]
    bodies = [chat_body(example_url(n), max_tokens=20) for n in names]
    alone = [stream_text(server, b) for b in bodies]
    hostile = [text_body(**(f(server) if callable(f) else f)) for f, _ in OUT_OF_BOUNDS.values()]
    hostile += [raw_body(f'"top_k": {"9" * 5003}'), raw_body('"user": "\\udabc"'),
                chat_body(data_url(EPS), max_tokens=3), chat_body(None, question="x" * (2 * 2**20))]
    got, statuses, errors = [None] * len(bodies), [], server.engine.stats().finished["error"]

    def normal(i):
        got[i] = stream_text(server, bodies[i])

    def attacker():
        for body in hostile:
            statuses.append(post(server, body).status_code)

    threads = [threading.Thread(target=normal, args=(i,)) for i in range(len(got))]
    threads.append(threading.Thread(target=attacker))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got == alone  # greedy: the same text as alone, whoever else was there
    assert statuses == [400] * len(hostile)
    deadline = time.monotonic() + 30
    while (stats := server.engine.stats()).active_slots or stats.queue_depth:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stats.accepted == sum(stats.finished.values()) and stats.finished["error"] == errors
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
