"""Image URLs: `http(s)://` images fetched from the domains the server allows, bounded.

    fetcher = Fetcher(FetchPolicy(domains=("images.example.com",)), max_bytes=20 << 20)
    data = await fetcher.get(url, param)     # the image's bytes; APIError 400 with a code

A URL is fetched only when its host is one of `--allowed_media_domains` (exactly, no
subdomains; none by default, then every `http(s)://` URL is refused before any I/O). The host
is resolved off the event loop under the deadline and every address it resolves to must be
public (no loopback, private, link-local, shared, multicast or reserved range, IPv4-mapped
IPv6 included) unless `allow_private`; the connection then goes to a checked address (TLS still
verifies the host name), so a second resolution cannot switch it to another (DNS rebinding).
The download runs in a worker thread (the server's download pool): one deadline for the whole fetch (each socket
read waits at most until it, so a slow body cannot hold a request), the size cap checked
against Content-Length and again while the body streams, redirects followed only on the same
host (at most `MAX_REDIRECTS`). The bytes then go through the data URL's image checks
(`media.pixel_values`).

Codes (all 400): image_url_not_allowed (scheme or host), image_url_private_address,
image_url_unreachable (no address, refused connection, TLS failure), image_url_timeout,
image_url_too_large, image_url_redirect (to another host, or too many), image_url_http_error
(a status other than 200), image_url_not_image (a Content-Type that is not an image).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse

from safevlm_jax.serve.errors import bad_request

MAX_REDIRECTS = 3
MAX_URL_CHARS = 8192
CHUNK = 1 << 16
# a body without Content-Type, or a generic one, is judged by its bytes as a data URL's is
GENERIC_TYPES = ("", "application/octet-stream", "binary/octet-stream")


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """domains: hosts whose images may be fetched (lowercase; empty: none); allow_private:
    also fetch from loopback/private addresses (tests, a trusted network); timeout_s: the
    whole fetch, from resolution to the last byte."""

    domains: tuple[str, ...] = ()
    allow_private: bool = False
    timeout_s: float = 5.0


@dataclasses.dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str


class Fetcher:
    """Fetches image URLs under `policy`, at most `max_bytes` each; `run(fn, *args)` runs a
    blocking call off the event loop (a thread pool) and returns its result."""

    def __init__(self, policy: FetchPolicy, max_bytes: int, run):
        self.policy, self.max_bytes, self.run = policy, max_bytes, run

    @staticmethod
    def is_remote(url: str) -> bool:
        return url[:8].lower().startswith(("http://", "https://"))

    async def get(self, url: str, param: str) -> bytes:
        """The image bytes at `url`; APIError 400 naming `param` (see the module's codes)."""
        target = self._target(url, param)
        deadline = time.monotonic() + self.policy.timeout_s
        sockets = []  # the worker's connection, shut down here if the deadline passes first
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                addresses = await self._resolve(target, param)  # same-host redirects keep them
                for _ in range(MAX_REDIRECTS + 1):
                    location, body = await self.run(self._download, target, addresses, deadline, param, sockets)
                    if location is None:
                        return body
                    target = self._redirect(target, location, param)
        except TimeoutError:
            for sock in sockets:  # wakes a worker still waiting on it (a trickling server)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            raise bad_request(f"fetching {_shown(url)} took more than {self.policy.timeout_s:g} s", param,
                              "image_url_timeout") from None
        raise bad_request(f"{_shown(url)} redirects more than {MAX_REDIRECTS} times", param, "image_url_redirect")

    def _target(self, url: str, param: str) -> _Target:
        if not self.policy.domains:
            raise bad_request("this server fetches no image URLs (start it with --allowed_media_domains to "
                              f"allow some); send the image as data:image/<type>;base64,...; got {_shown(url)}",
                              param, "image_url_not_allowed")
        if len(url) > MAX_URL_CHARS or any(c <= " " or c == "\x7f" for c in url):
            raise bad_request(f"malformed image URL: more than {MAX_URL_CHARS} characters, or a space or control "
                              f"character (percent-encode it)", param, "invalid_image_url")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError as e:
            raise bad_request(f"malformed image URL ({e})", param, "invalid_image_url") from None
        host = (parts.hostname or "").lower()
        if host not in self.policy.domains:
            raise bad_request(f"image URLs are fetched only from {', '.join(self.policy.domains)}; "
                              f"got host {host[:80]!r}", param, "image_url_not_allowed")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return _Target(parts.scheme.lower(), host, port, path)

    def _redirect(self, target: _Target, location: str, param: str) -> _Target:
        url = urllib.parse.urljoin(f"{target.scheme}://{target.host}:{target.port}{target.path}", location)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or (parts.hostname or "").lower() != target.host:
            raise bad_request(f"the image URL redirects to another host ({_shown(url)}); only redirects on "
                              f"{target.host} are followed", param, "image_url_redirect")
        return self._target(url, param)

    async def _resolve(self, target: _Target, param: str) -> list[str]:
        """Every address of the host, each one checked (all must pass: one answer could be
        picked by a later connection)."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            raise bad_request(f"cannot resolve {target.host!r} ({e})", param, "image_url_unreachable") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            if not self.policy.allow_private and not _public(address):
                raise bad_request(f"{target.host!r} resolves to {address}, a loopback, private, link-local or "
                                  f"reserved address: not fetched", param, "image_url_private_address")
        return addresses

    def _download(self, target: _Target, addresses: list[str], deadline: float, param: str, sockets: list):
        """(same-host redirect location or None, body) from the first address that connects;
        blocking, in a worker thread; each wait ends by `deadline` (and `get` shuts the socket,
        appended to `sockets`, down at the deadline: a server sending a byte at a time)."""
        conn = http.client.HTTPConnection(target.host, target.port)
        try:
            sock = conn.sock = _connect(target, addresses, deadline, param)  # http.client does not resolve again
            sockets.append(sock)
            conn.request("GET", target.path, headers={"Accept": "image/*", "User-Agent": "safevlm_jax"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("location"):
                return response.getheader("location"), b""
            if response.status != 200:
                raise bad_request(f"the image URL answered HTTP {response.status} {response.reason[:80]}",
                                  param, "image_url_http_error")
            kind = (response.getheader("content-type") or "").split(";")[0].strip().lower()
            if not kind.startswith("image/") and kind not in GENERIC_TYPES:
                raise bad_request(f"the image URL's Content-Type is {kind[:80]!r}, not an image", param,
                                  "image_url_not_image")
            return None, self._body(response, sock, deadline, param)
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, TimeoutError) or time.monotonic() >= deadline:
                raise bad_request(f"fetching the image took more than {self.policy.timeout_s:g} s", param,
                                  "image_url_timeout") from None
            raise bad_request(f"fetching the image failed ({type(e).__name__}: {e})", param,
                              "image_url_unreachable") from None
        finally:
            conn.close()

    def _body(self, response, sock: socket.socket, deadline: float, param: str) -> bytes:
        too_large = bad_request(f"the image is larger than {self.max_bytes} bytes", param, "image_url_too_large")
        length = response.getheader("content-length") or ""
        if length.isdigit() and int(length) > self.max_bytes:
            raise too_large
        chunks, size = [], 0
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = response.read1(CHUNK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_bytes:
                raise too_large
            if time.monotonic() >= deadline:
                raise TimeoutError
            chunks.append(chunk)


def _connect(target: _Target, addresses: list[str], deadline: float, param: str) -> socket.socket:
    error = None
    for address in addresses:
        try:
            sock = socket.create_connection((address, target.port), timeout=max(deadline - time.monotonic(), 0.001))
        except OSError as e:
            error = e
            continue
        if target.scheme == "https":
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
            except (OSError, ssl.SSLError) as e:
                sock.close()
                raise bad_request(f"TLS with {target.host!r} failed ({e})", param, "image_url_unreachable") from None
        return sock
    if isinstance(error, TimeoutError):
        raise error
    raise bad_request(f"cannot connect to {target.host}:{target.port} ({error})", param, "image_url_unreachable")


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 scope (fe80::1%eth0) is link-local
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


def _shown(url: str) -> str:
    return repr(url if len(url) <= 80 else url[:77] + "...")
