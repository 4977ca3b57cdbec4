"""Image URL fetching (`serve/fetch.py`) against a local HTTP server: what is fetched, and every
refusal one 400 with its own code, within the deadline, whatever the server does."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from safevlm_jax.serve.errors import APIError
from safevlm_jax.serve.fetch import Fetcher, FetchPolicy, _public
from tests.media_server import IMAGE, media_server

MAX_BYTES = 1 << 20
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def base():
    with media_server() as url:
        yield url


def fetch(url: str, **policy) -> bytes:
    async def go():
        loop = asyncio.get_running_loop()
        policy.setdefault("domains", ("localhost",))
        fetcher = Fetcher(FetchPolicy(**{"allow_private": True, "timeout_s": TIMEOUT_S, **policy}), MAX_BYTES,
                          lambda fn, *args: loop.run_in_executor(None, fn, *args))
        return await fetcher.get(url, "messages[0].content[0].image_url.url")
    return asyncio.run(go())


def refused(url: str, **policy) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(APIError) as e:
        fetch(url, **policy)
    assert e.value.status == 400 and e.value.param == "messages[0].content[0].image_url.url"
    return e.value.code, time.monotonic() - start


def test_allowed_host_image_bytes_come_back_whole_also_through_a_same_host_redirect(base):
    assert fetch(f"{base}/image.png") == IMAGE
    assert fetch(f"{base}/image.bin") == IMAGE  # a generic type is judged by its bytes later
    assert fetch(f"{base}/same_host") == IMAGE


@pytest.mark.parametrize("path, code", [
    ("/other_host", "image_url_redirect"), ("/loop", "image_url_redirect"), ("/missing", "image_url_http_error"),
    ("/page", "image_url_not_image"), ("/huge_declared", "image_url_too_large"), ("/huge", "image_url_too_large"),
])
def test_each_bad_answer_is_refused_with_its_code(base, path, code):
    assert refused(f"{base}{path}")[0] == code


@pytest.mark.parametrize("path", ["/slow", "/slow_header"])
def test_a_trickling_server_is_cut_at_the_deadline(base, path):
    code, seconds = refused(f"{base}{path}")
    assert code == "image_url_timeout" and TIMEOUT_S <= seconds < TIMEOUT_S + 1


def test_hosts_schemes_and_private_addresses_are_refused_before_any_request(base):
    assert refused(f"{base}/image.png", domains=())[0] == "image_url_not_allowed"
    assert refused(f"{base}/image.png", domains=("example.com",))[0] == "image_url_not_allowed"
    assert refused(f"{base.replace('localhost', 'sub.localhost')}/image.png")[0] == "image_url_not_allowed"
    assert refused(f"{base}/image.png", allow_private=False)[0] == "image_url_private_address"
    assert refused("http://localhost:1/image.png")[0] == "image_url_unreachable"  # nothing listens
    assert refused(f"{base}/image.png HTTP/1.1\r\nX-Injected: 1")[0] == "invalid_image_url"
    assert refused(f"{base}/{'a' * 9000}")[0] == "invalid_image_url"
    assert refused(f"{base.replace('http:', 'https:')}/image.png")[0] == "image_url_unreachable"  # no TLS there


def test_the_connection_goes_to_the_checked_address_not_a_second_resolution(base, monkeypatch):
    """DNS rebinding: a second resolution of the host would give a private address (refused
    if checked); the fetch connects to the address it checked and never resolves again."""
    real, calls = socket.getaddrinfo, []

    def rebinding(host, *args, **kw):
        if host != "localhost":  # an address (socket.create_connection passes it through here)
            return real(host, *args, **kw)
        calls.append(host)
        return real("127.0.0.1" if len(calls) == 1 else "10.0.0.1", *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    assert fetch(f"{base}/same_host") == IMAGE and calls == ["localhost"]


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("240.0.0.1", False), ("::1", False), ("fe80::1%eth0", False),
    ("fc00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True),
])
def test_only_global_unicast_addresses_count_as_public(address, public):
    assert _public(address) == public
