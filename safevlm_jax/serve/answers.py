"""One chat request's answer from the engine's events: one JSON body, or server-sent events.

The engine calls `Answer.put(index, event)` from its own thread for each of the request's
choices (OpenAI's `n`); the request's coroutine reads the events in order (per choice:
verdict, text deltas, done). `Answer.whole` builds `chat.completion`, `Answer.stream` yields
`chat.completion.chunk` events, each choice's first carrying the verdict, then `data: [DONE]`.
Either way, a client that goes away cancels its engine requests, which frees their slots.
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
    """One chat request's answer over `n` choices. `put` is the engine's `on_event` (its
    thread): it records the metrics (so they count even if the client has gone) and hands the
    event to the server's loop; `whole` or `stream` reads the events there, in order.
    texts: token ids -> text (`responses.TokenTexts`), for `top_logprobs` alternatives each."""

    def __init__(self, rid: str, model: str, metrics: Metrics, loop: asyncio.AbstractEventLoop, n: int = 1,
                 texts: responses.TokenTexts | None = None, top_logprobs: int = 0):
        self.rid, self.model, self.metrics, self.loop, self.n = rid, model, metrics, loop, n
        self.texts, self.top = texts, top_logprobs
        self._started = [False] * n  # a choice's first logprobs were streamed
        self.arrived, self.first_text, self.queue = time.perf_counter(), False, asyncio.Queue()
        self.finished = 0  # choices whose "done" the engine has sent
        self.handles: list = []

    @property
    def done(self) -> bool:
        return self.finished >= self.n

    def put(self, index: int, event) -> None:
        if event.kind == "verdict":
            if index == 0:
                self.metrics.verdict(event.verdict)
        elif not self.first_text:  # the first text, or the end of an answer without text
            self.first_text = True
            self.metrics.ttft.observe(time.perf_counter() - self.arrived)
        if event.kind == "done":
            self.finished += 1
            self.metrics.finish_reasons.labels(event.finish_reason).inc()
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    async def events(self):
        left = self.n
        while left:
            index, event = await self.queue.get()
            yield index, event
            left -= event.kind == "done"

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    def _logprobs(self, index: int, event) -> dict | None:
        if self.texts is None:
            return None
        first, self._started[index] = not self._started[index], self._started[index] or bool(event.logprobs)
        return self.texts.content(event.logprobs, self.top, first)

    async def whole(self, request: Request) -> Response:
        watcher = self.watch(request)
        texts, logprobs = [[] for _ in range(self.n)], [[] for _ in range(self.n)]
        safety, done = None, [None] * self.n
        try:
            async for index, event in self.events():
                if event.kind == "verdict":
                    safety = responses.safety_object(event.verdict) if index == 0 else safety
                elif event.kind == "text":
                    texts[index].append(event.text)
                    logprobs[index] += event.logprobs
                else:
                    done[index] = event
        finally:
            watcher.cancel()
        reasons = {event.finish_reason for event in done}
        if "cancelled" in reasons:
            if getattr(request.state, "disconnected", False):
                return Response(status_code=499)  # nobody reads it; counted as 499
            raise APIError(503, "the request was cancelled (server shutting down)", code="cancelled")
        if "error" in reasons:
            error = next(event.error for event in done if event.finish_reason == "error")
            raise APIError(500, f"generation failed: {error}", code="generation_error")
        completion_tokens = sum(event.completion_tokens for event in done)
        request.state.tokens = (done[0].prompt_tokens, completion_tokens)
        choices = [responses.choice(i, "".join(texts[i]), done[i].finish_reason, safety,
                                    None if self.texts is None else self.texts.content(logprobs[i], self.top, first=True))
                   for i in range(self.n)]
        return JSONResponse(responses.chat_completion(self.rid, self.model, choices, done[0].prompt_tokens,
                                                      completion_tokens))

    def watch(self, request: Request) -> asyncio.Task:
        """A task that cancels the request if its client goes away first (kept on `self`,
        so it lives as long as the answer)."""
        self.watcher = asyncio.ensure_future(self._watch(request))
        return self.watcher

    async def _watch(self, request: Request) -> None:
        # After the body was read, `receive` yields only http.disconnect: when the client
        # leaves, or (uvicorn) once the response is complete, which `done` tells apart.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not self.done:
            request.state.disconnected = True
            self.cancel()

    async def stream(self, request: Request, include_usage: bool):
        created, finished, prompt_tokens, completion_tokens = int(time.time()), False, 0, 0
        chunk = lambda *a, **k: _sse(responses.chat_chunk(self.rid, self.model, created, *a, **k))
        try:
            async for index, event in self.events():
                if event.kind == "verdict":
                    yield chunk({"role": "assistant", "content": ""}, index=index,
                                safety=responses.safety_object(event.verdict))
                elif event.kind == "text":
                    yield chunk({"content": event.text}, index=index, logprobs=self._logprobs(index, event))
                elif event.finish_reason in ("error", "cancelled"):
                    finished = True
                    error = APIError(500 if event.finish_reason == "error" else 503,
                                     f"generation {event.finish_reason}: {event.error}",
                                     code=f"generation_{event.finish_reason}")
                    yield _sse(error.body())
                    self.cancel()
                    break
                else:
                    prompt_tokens, completion_tokens = event.prompt_tokens, completion_tokens + event.completion_tokens
                    yield chunk({}, event.finish_reason, index=index)
            else:
                finished = True
                request.state.tokens = (prompt_tokens, completion_tokens)
                if include_usage:
                    yield _sse(responses.usage_chunk(self.rid, self.model, created, prompt_tokens,
                                                     completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (Starlette cancelled us): free the slots
                request.state.disconnected = True
                self.cancel()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
