"""One chat request's answer from the engine's events: one JSON body, or server-sent events.

The engine calls `Answer.put` from its own thread; the request's coroutine reads the events
in order (verdict, text deltas, done). `Answer.whole` builds `chat.completion`, `Answer.stream`
yields `chat.completion.chunk` events, the first carrying the verdict, then `data: [DONE]`.
Either way, a client that goes away cancels its engine request, which frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from safevlm_jax.serve import responses
from safevlm_jax.serve.errors import APIError
from safevlm_jax.serve.metrics import Metrics


class Answer:
    """One chat request's answer. `put` is the engine's `on_event` (its thread): it records the
    metrics (so they count even if the client has gone) and hands the event to the server's
    loop; `whole` or `stream` reads the events there, in order."""

    def __init__(self, rid: str, model: str, metrics: Metrics, loop: asyncio.AbstractEventLoop):
        self.rid, self.model, self.metrics, self.loop = rid, model, metrics, loop
        self.arrived, self.first_text, self.queue = time.perf_counter(), False, asyncio.Queue()
        self.done = False  # the engine has sent "done"

    def put(self, event) -> None:
        if event.kind == "verdict":
            self.metrics.verdict(event.verdict)
        elif not self.first_text:  # the first text, or the end of an answer without text
            self.first_text = True
            self.metrics.ttft.observe(time.perf_counter() - self.arrived)
        if event.kind == "done":
            self.done = True
            self.metrics.finish_reasons.labels(event.finish_reason).inc()
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    async def events(self):
        while True:
            event = await self.queue.get()
            yield event
            if event.kind == "done":
                return

    async def whole(self, handle, request: Request) -> Response:
        watcher = self.watch(handle, request)
        text, safety = [], None
        try:
            async for event in self.events():
                if event.kind == "verdict":
                    safety = responses.safety_object(event.verdict)
                elif event.kind == "text":
                    text.append(event.text)
        finally:
            watcher.cancel()
        if event.finish_reason == "cancelled":
            if getattr(request.state, "disconnected", False):
                return Response(status_code=499)  # nobody reads it; counted as 499
            raise APIError(503, "the request was cancelled (server shutting down)", code="cancelled")
        if event.finish_reason == "error":
            raise APIError(500, f"generation failed: {event.error}", code="generation_error")
        request.state.tokens = (event.prompt_tokens, event.completion_tokens)
        return JSONResponse(responses.chat_completion(
            self.rid, self.model, "".join(text), event.finish_reason, safety,
            event.prompt_tokens, event.completion_tokens))

    def watch(self, handle, request: Request) -> asyncio.Task:
        """A task that cancels the request if its client goes away first (kept on `self`,
        so it lives as long as the answer)."""
        self.watcher = asyncio.ensure_future(self._watch(handle, request))
        return self.watcher

    async def _watch(self, handle, request: Request) -> None:
        # After the body was read, `receive` yields only http.disconnect: when the client
        # leaves, or (uvicorn) once the response is complete, which `done` tells apart.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not self.done:
            request.state.disconnected = True
            handle.cancel()

    async def stream(self, handle, request: Request, include_usage: bool):
        created, finished = int(time.time()), False
        try:
            async for event in self.events():
                if event.kind == "verdict":
                    chunk = responses.chat_chunk(self.rid, self.model, created,
                                                 {"role": "assistant", "content": ""},
                                                 safety=responses.safety_object(event.verdict))
                elif event.kind == "text":
                    chunk = responses.chat_chunk(self.rid, self.model, created, {"content": event.text})
                elif event.finish_reason in ("error", "cancelled"):
                    finished = True
                    error = APIError(500 if event.finish_reason == "error" else 503,
                                     f"generation {event.finish_reason}: {event.error}",
                                     code=f"generation_{event.finish_reason}")
                    yield _sse(error.body())
                    break
                else:
                    finished = True
                    request.state.tokens = (event.prompt_tokens, event.completion_tokens)
                    yield _sse(responses.chat_chunk(self.rid, self.model, created, {}, event.finish_reason))
                    if include_usage:
                        yield _sse(responses.usage_chunk(self.rid, self.model, created,
                                                         event.prompt_tokens, event.completion_tokens))
                    break
                yield _sse(chunk)
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (Starlette cancelled us): free the slot
                request.state.disconnected = True
                handle.cancel()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
