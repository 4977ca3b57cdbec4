"""Bad input gets OpenAI's JSON error with the right status, and the server keeps serving."""

from __future__ import annotations

import json
import socket
import struct
import zlib

import httpx
import pytest

from tests.serve_helpers import chat_body, data_url, example_url, live_server, png_bytes

MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def engine(demo_engine):
    return demo_engine


@pytest.fixture(scope="module")
def server(engine):
    with live_server(engine, max_body_bytes=MAX_BODY) as s:
        yield s


def post(server, body, path="/v1/chat/completions", **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        kw["content"] = body
        kw.setdefault("headers", {"Content-Type": "application/json"})
    else:
        kw["json"] = body
    return httpx.post(f"{server.url}{path}", timeout=60, **kw)


def expect_error(r: httpx.Response, status: int, code: str, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code, error
    assert error["type"] == ("authentication_error" if status == 401 else "invalid_request_error")
    if param != "any":
        assert error["param"] == param, error
    return error


def bomb_png(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims width x height (CRC fixed): a decompression bomb."""
    data = bytearray(png_bytes(8, 8))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def with_image(url: str) -> dict:
    return chat_body(url, max_tokens=4)


URL = "messages[0].content[0].image_url.url"  # where with_image puts the image


CASES = {
    "malformed_json": (b'{"messages": [', 400, "invalid_json", None),
    "body_not_an_object": (b"[1, 2]", 400, "invalid_body", None),
    "missing_messages": ({"model": "demo"}, 400, "missing_required_parameter", "messages"),
    "image_url_without_url": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                              400, "invalid_image_url", "messages[0].content[0].image_url.url"),
    "non_image_data_url": (with_image("data:text/plain;base64,aGVsbG8="), 400, "invalid_image_url", URL),
    "data_url_not_base64": (with_image("data:image/png;base64,***"), 400, "invalid_image_url", URL),
    "https_url": (with_image("https://example.com/cat.png"), 400, "image_url_not_allowed", URL),
    "file_url": (with_image("file:///etc/passwd"), 400, "image_url_not_allowed", URL),
    "corrupt_image_bytes": (with_image(data_url(b"\x89PNG\r\n\x1a\n not really a png")), 400, "corrupt_image", URL),
    "truncated_image": (with_image(data_url(png_bytes(64, 64)[:70])), 400, "corrupt_image", URL),
    "decompression_bomb": (with_image(data_url(bomb_png(100_000, 100_000))), 400, "image_too_large", URL),
    "two_images": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(8, 8))}},
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(8, 8))}}]}]},
        400, "too_many_images", "messages[0].content[1].image_url.url"),
    "n_above_8": (chat_body(n=9), 400, "invalid_value", "n"),
    "tools": (chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_parameter", "tools"),
    "top_logprobs_without_logprobs": (chat_body(top_logprobs=2), 400, "invalid_value", "top_logprobs"),
    "five_stops": (chat_body(stop=list("abcde")), 400, "invalid_value", "stop"),
    "response_format_unknown": (chat_body(response_format={"type": "xml"}), 400, "invalid_value", "response_format"),
    "unknown_field": (chat_body(max_token=5), 400, "unknown_parameter", "max_token"),
    "wrong_type": (chat_body(temperature="hot"), 400, "invalid_value", "temperature"),
    "out_of_range": (chat_body(top_p=0), 400, "invalid_value", "top_p"),
    "tool_message": ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]},
                     400, "unsupported_conversation", "messages[1].role"),
    "ends_with_assistant": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                            400, "unsupported_conversation", "messages"),
    "images_in_two_turns": ({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(8, 8))}}]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                     {"type": "image_url", "image_url": {"url": data_url(png_bytes(8, 8))}}]}]},
        400, "too_many_images", "messages[2].content[1].image_url.url"),
    "unknown_model": (chat_body(model="gpt-4o"), 404, "model_not_found", "model"),
    "audio_part": ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
                   400, "unsupported_content_type", "messages[0].content[0].type"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_chat_request_gets_an_openai_error(server, case):
    body, status, code, param = CASES[case]
    error = expect_error(post(server, body), status, code, param)
    if case == "file_url":
        assert "root:" not in error["message"]  # nothing of the file came back


def test_http_image_url_is_refused_and_nothing_is_fetched(server):
    with socket.socket() as listener:  # a local "image host": it must see no connection
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/cat.png"
        expect_error(post(server, with_image(url)), 400, "image_url_not_allowed", URL)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_body_over_the_limit_gets_413(server):
    body = json.dumps(chat_body(question="x" * (MAX_BODY + 1000))).encode()
    expect_error(post(server, body), 413, "request_too_large")


def test_prompt_plus_max_tokens_over_the_context_names_the_limit(server):
    error = expect_error(post(server, chat_body(example_url("clean"), max_tokens=100_000)), 400,
                         "context_length_exceeded", "max_tokens")
    assert str(server.engine.stats().max_length) in error["message"]
    assert any(ch.isdigit() for ch in error["message"])


def test_moderation_without_an_image_is_refused(server):
    expect_error(post(server, {"input": "some text"}, "/v1/moderations"), 400, "image_required", "input")
    expect_error(post(server, {"input": [{"type": "text", "text": "only text parts"}]}, "/v1/moderations"),
                 400, "image_required", "input")
    expect_error(post(server, {"input": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
                      "/v1/moderations"), 400, "image_url_not_allowed", "input[0].image_url.url")


def test_unknown_route_is_an_openai_shaped_404(server):
    error = expect_error(httpx.get(f"{server.url}/v1/completions"), 404, "not_found")
    assert "/v1/completions" in error["message"]


def test_api_key_is_required_when_set(engine):
    with live_server(engine, api_key="s3cret") as keyed:
        body = chat_body(example_url("clean"), max_tokens=4)
        expect_error(post(keyed, body), 401, "invalid_api_key")
        expect_error(post(keyed, body, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
        expect_error(post(keyed, {"input": []}, "/v1/moderations"), 401, "invalid_api_key")
        assert post(keyed, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{keyed.url}/health").status_code == 200  # probes need no key


def test_server_keeps_serving_after_every_bad_request(server):
    for body, *_ in CASES.values():
        post(server, body)
    r = post(server, chat_body(example_url("risky"), max_tokens=24))
    assert r.status_code == 200
    assert r.json()["choices"][0]["safety"]["risk_level"] == 3
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'safevlm_requests_total{endpoint="chat",status="400"}' in metrics
