"""A real uvicorn server on 127.0.0.1 (a free port), in a thread, over the shipped demo model.

Most tests take the session fixtures of tests/conftest.py (`demo_vlm`, `demo_engine`,
`demo_api`); the context managers here build an engine or a server of their own around them."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import threading
import time

import uvicorn

from safevlm_jax.checkpoint.demo import DEMO_DIR
from safevlm_jax.serve.app import ServeSettings, create_app

EXAMPLES = os.path.join(DEMO_DIR, "examples")
QUESTION = "What is shown in this image?"
DEMO_ENGINE = {"slots": 8}  # the shared `demo_engine`'s shape; its context is the model's 512 positions


def demo_inference(**kw):
    from safevlm_jax.inference.pipeline import SafeVLMInference

    return SafeVLMInference.from_checkpoint(DEMO_DIR, **kw)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def example_url(name: str) -> str:
    """An example image of the demo (clean, low_risk, medium_risk, risky) as a data: URL."""
    with open(os.path.join(EXAMPLES, f"{name}.png"), "rb") as f:
        return data_url(f.read())


def png_bytes(width: int, height: int, color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def chat_body(image: str | None = None, question: str = QUESTION, **kw) -> dict:
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"model": "demo", "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


class LiveServer:
    """`create_app(engine, settings)` served by uvicorn in a daemon thread."""

    def __init__(self, engine, settings: ServeSettings):
        self.engine = engine
        self.app = create_app(engine, settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]  # port 0: the one it got
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@contextlib.contextmanager
def live_engine(inference, **kw):
    from safevlm_jax.inference.engine import Engine

    engine = Engine.from_inference(inference, **kw)
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown(drain=False)


@contextlib.contextmanager
def live_server(engine, **settings):
    server = LiveServer(engine, ServeSettings(**{"model_name": "demo", **settings}))
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def demo_server(**engine_kw):
    """A LiveServer (model id "demo") over a new Engine of the demo model, for a test that
    needs an engine of its own (`demo_api` is the shared one)."""
    inference = demo_inference()
    with live_engine(inference, **engine_kw) as engine, live_server(engine) as server:
        yield server
