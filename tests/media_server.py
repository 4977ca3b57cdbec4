"""A local HTTP server on 127.0.0.1 serving the image URL cases: an image, a huge body, a slow
body, a slow header, redirects (same host, another host), a 404, a page that is not an image."""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
import time

from tests.serve_helpers import EXAMPLES

IMAGE = open(os.path.join(EXAMPLES, "clean.png"), "rb").read()
HUGE = 64 << 20  # bytes a huge body would send


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def send(self, status: int, body: bytes, kind: str | None = "image/png", length: bool = True, **headers):
        self.send_response(status)
        if kind:
            self.send_header("Content-Type", kind)
        if length:
            self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def trickle(self, data: bytes, pause_s: float = 0.2) -> None:
        with contextlib.suppress(OSError):
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(pause_s)

    def do_GET(self):
        port = self.server.server_address[1]
        path = self.path.split("?")[0]
        if path == "/image.png":
            self.send(200, IMAGE)
        elif path == "/image.bin":
            self.send(200, IMAGE, "application/octet-stream")
        elif path == "/huge_declared":
            self.send(200, b"", length=False, Content_Length=str(HUGE))
        elif path == "/huge":  # no Content-Length: the cap must hold while the body streams
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Connection", "close")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(HUGE >> 16):
                    self.wfile.write(b"\0" * (1 << 16))
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(IMAGE)))
            self.end_headers()
            self.trickle(IMAGE)
        elif path == "/slow_header":
            self.trickle(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000)
        elif path == "/same_host":
            self.send(302, b"", None, Location="/image.png")
        elif path == "/other_host":
            self.send(302, b"", None, Location=f"http://127.0.0.1:{port}/image.png")
        elif path == "/loop":
            self.send(302, b"", None, Location="/loop")
        elif path == "/page":
            self.send(200, b"<html>not an image</html>", "text/html")
        elif path == "/garbage":
            self.send(200, b"not an image at all", "application/octet-stream")
        else:
            self.send(404, b"not found", "text/plain")


@contextlib.contextmanager
def media_server():
    """Yields the server's base URL, named by host `localhost` (so 127.0.0.1 is another host)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
