"""Per-request accounting: the Prometheus counters and one access-log line per HTTP answer.

    app.add_middleware(RequestLog, metrics=metrics)
    access_log.to_stderr()          # the command does this; a library user routes the logger

A line (logger `safevlm_jax.serve.access`, INFO):

    2026-12-08T00:30:00Z 127.0.0.1 POST /v1/chat/completions 200 0.532s tokens=57+12

client address, method, path (no query string), status (499: the client went away first),
seconds from arrival to the last byte, and for a chat answer its prompt + completion tokens.
The prompt text is logged only when the server allows it (`--log_prompts`): handlers put it in
`request.state.prompt`, the answer its token counts in `request.state.tokens`.
"""

from __future__ import annotations

import logging
import sys
import time
import urllib.parse

from safevlm_jax.serve.metrics import Metrics

LOGGER = logging.getLogger("safevlm_jax.serve.access")
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/moderations": "moderations", "/v1/models": "models",
             "/health": "health", "/metrics": "metrics", "/": "page"}
PROMPT_CHARS = 2000  # the most of a prompt one line shows


def to_stderr() -> None:
    """Access lines on stderr, one each, whatever the root logger's level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%dT%H:%M:%SZ"))
    handler.formatter.converter = time.gmtime
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def endpoint(path: str) -> str:
    """A metrics label of bounded cardinality for a path."""
    if path.startswith("/v1/models/"):
        return "models"
    return ENDPOINTS.get(path, "static" if path.startswith(("/static/", "/examples")) else "other")


class RequestLog:
    """ASGI middleware: counts every answer by endpoint and status and logs its line."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, start = [500], time.perf_counter()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            state, seconds = scope.get("state", {}), time.perf_counter() - start
            code = 499 if state.get("disconnected") else status[0]
            self.metrics.requests.labels(endpoint(scope["path"]), str(code)).inc()
            self.metrics.latency.labels(endpoint(scope["path"])).observe(seconds)
            if LOGGER.isEnabledFor(logging.INFO):
                LOGGER.info(line(scope, code, seconds, state))


def line(scope, status: int, seconds: float, state: dict) -> str:
    client = scope.get("client") or ("-", 0)
    path = urllib.parse.quote(scope["path"][:200], safe="/:@!$&'()*+,;=~")  # one line, whatever it holds
    out = f"{client[0]} {scope['method']} {path} {status} {seconds:.3f}s"
    if "tokens" in state:
        out += " tokens={}+{}".format(*state["tokens"])
    if "prompt" in state:
        prompt = state["prompt"]
        out += f" prompt={prompt[:PROMPT_CHARS]!r}" + ("..." if len(prompt) > PROMPT_CHARS else "")
    return out
