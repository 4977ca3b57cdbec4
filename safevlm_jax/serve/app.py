"""The HTTP app: OpenAI's chat and moderation endpoints over a running `Engine`.

    app = create_app(engine, ServeSettings(model_name="demo"))
    uvicorn.run(app, host="127.0.0.1", port=8000)      # or `python -m safevlm_jax.serve`

Each accepted chat request is one `engine.submit`; the engine's events (verdict, text deltas,
done) come from its thread into the request's asyncio queue and out as one JSON answer or as
server-sent events. Every accepted request gets exactly one answer or one error; a client that
goes away is noticed (Starlette's disconnect listener for streams, a watcher on `receive` for
plain answers) and its request cancelled, which frees its slot. The app does not own the
engine: whoever starts it shuts it down after the server has finished its requests.

The event loop only moves bytes: decoding a body (`bodies.decode_json`, `schemas`), an image
(`media`) and tokenizing a prompt (`engine.submit`) run in a pool of `input_workers` threads,
an image URL's download (`fetch`, under its deadline) in another pool of that size, so
`/health` and every stream keep answering while large or hostile requests are worked on.
`/openapi.json` is the schema of every route, its request bodies from `schemas`; `/` is the
web demo (`static/`), its one-click samples the shipped example images (`/examples.json`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import os
import secrets

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from safevlm_jax.checkpoint.demo import DEMO_DIR
from safevlm_jax.inference.engine import EngineClosed, EngineRequest, QueueFull
from safevlm_jax.inference.errors import CONTEXT_LENGTH, BadRequest
from safevlm_jax.safety.prompt import Conversation
from safevlm_jax.safety.taxonomy import RISK_LEVELS, RISK_TYPES
from safevlm_jax.serve import media, responses
from safevlm_jax.serve.access_log import RequestLog
from safevlm_jax.serve.answers import Answer
from safevlm_jax.serve.bodies import decode_json, read_body
from safevlm_jax.serve.errors import APIError, bad_request
from safevlm_jax.serve.fetch import Fetcher, FetchPolicy
from safevlm_jax.serve.metrics import Metrics
from safevlm_jax.serve.schemas import ChatBody, ChatInput, Limits, ModerationBody, parse_chat, parse_moderation

SYSTEM_PROMPT = ("allow", "ignore", "refuse")
STATIC = os.path.join(os.path.dirname(__file__), "static")  # the web demo: plain HTML/JS/CSS
EXAMPLES = os.path.join(DEMO_DIR, "examples")  # the shipped example images, the page's samples


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """model_name: the id of `/v1/models`; model_aliases: other ids requests may name (any
    other gets 404); api_key: required as `Authorization: Bearer KEY` on /v1/* when set;
    max_body_bytes: larger bodies get 413, and larger fetched images 400; max_image_pixels:
    the decompression-bomb limit; default_max_tokens: when a request gives none;
    input_workers: threads decoding bodies and images and tokenizing prompts; media: which
    image URLs are fetched (`fetch.FetchPolicy`; default none); cors_origins: origins whose
    browser pages may call the API ("*": any; default none); log_prompts: the access log
    also shows each chat prompt; system_prompt: what system/developer messages do: "allow"
    (replace the template's system text), "ignore" (dropped), "refuse" (400)."""

    model_name: str = "safevlm"
    model_aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 25_000_000
    default_max_tokens: int = 256
    allow_safety_off: bool = True
    max_moderation_images: int = 16
    retry_after_s: int = 1
    input_workers: int = 4
    media: FetchPolicy = FetchPolicy()
    cors_origins: tuple[str, ...] = ()
    log_prompts: bool = False
    system_prompt: str = "allow"

    def __post_init__(self):
        if self.system_prompt not in SYSTEM_PROMPT:
            raise ValueError(f"system_prompt must be one of {SYSTEM_PROMPT}, got {self.system_prompt!r}")


def create_app(engine, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """engine: a started `Engine` (its image settings, tokenizer, requests, moderation and counters)."""
    pool = concurrent.futures.ThreadPoolExecutor(settings.input_workers, thread_name_prefix="safevlm-input")
    # downloads wait on the network: their own threads, so slow ones never delay decoding bodies
    downloads = concurrent.futures.ThreadPoolExecutor(settings.input_workers, thread_name_prefix="safevlm-fetch")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.shutdown(wait=False, cancel_futures=True)
        downloads.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="safevlm_jax", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.openapi = lambda: _openapi(app)
    metrics = Metrics(engine.stats)
    images = dataclasses.replace(engine.images, max_pixels=settings.max_image_pixels)
    limits = Limits(engine.config.text.vocab_size, engine.max_prompt_chars)
    texts = responses.TokenTexts(engine.tokenizer)
    app.state.metrics = metrics
    if settings.cors_origins:  # preflights answered here; every answer (errors too) gets the headers
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(RequestLog, metrics=metrics)  # the outermost: preflights are counted and logged too

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return APIError(e.status_code, f"{e.detail}: {request.method} {request.url.path}",
                        code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error").response()

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    names = (settings.model_name, *settings.model_aliases)

    def check_model(model: str | None, param: str | None = "model") -> None:
        if model is not None and model not in names:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{' or '.join(map(repr, names))}", param=param, code="model_not_found")

    async def work(fn, *args):
        """fn(*args) in the worker pool, off the event loop (its APIError comes back here)."""
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    fetcher = Fetcher(settings.media, settings.max_body_bytes,
                      lambda fn, *args: asyncio.get_running_loop().run_in_executor(downloads, fn, *args))

    async def pixel_values(ref) -> np.ndarray:
        """An image part -> pixel_values [S, S, 3]: a data: URL decoded, an http(s) URL fetched."""
        if not Fetcher.is_remote(ref.url):
            return await work(media.load, ref, images)
        return await work(media.pixel_values, await fetcher.get(ref.url, ref.param), images, ref.param)

    def chat_input(raw: bytes) -> ChatInput:
        chat = parse_chat(decode_json(raw, limits.max_separators), limits)
        if chat.system is not None and settings.system_prompt == "refuse":
            raise bad_request("this server does not take system or developer messages (--system_prompt refuse)",
                              "messages", "system_prompt_not_allowed")
        return dataclasses.replace(chat, system=None) if settings.system_prompt == "ignore" else chat

    def moderation_input(raw: bytes):
        return parse_moderation(decode_json(raw, limits.max_separators), limits, settings.max_moderation_images)

    @app.post("/v1/chat/completions", openapi_extra=_request_body(ChatBody))
    async def chat_completions(request: Request):
        authorize(request)
        chat = await work(chat_input, await read_body(request, settings.max_body_bytes))
        check_model(chat.model)
        if not chat.safety and not settings.allow_safety_off:
            raise APIError(403, "this server does not allow safety: false", param="safety",
                           code="safety_required")
        if settings.log_prompts:
            request.state.prompt = "\n".join(([f"system: {chat.system}"] if chat.system is not None else []) +
                                             [f"{turn.role}: {turn.value}" for turn in chat.turns])
        pixels = await pixel_values(chat.image) if chat.image else None
        answer = Answer(responses.new_id("chatcmpl"), settings.model_name, metrics, asyncio.get_running_loop(),
                        chat.n, texts if chat.logprobs else None, chat.top_logprobs)
        try:
            answer.handles = await work(engine.submit_choices, _engine_request(chat, pixels, settings), chat.n,
                                        answer.put)
        except QueueFull as e:
            raise APIError(503, f"the server is busy ({e})", code="queue_full",
                           headers={"Retry-After": str(settings.retry_after_s)}) from None
        except EngineClosed as e:
            raise APIError(503, str(e), code="shutting_down",
                           headers={"Retry-After": str(settings.retry_after_s)}) from None
        except BadRequest as e:
            raise _bad_engine_request(e, chat, settings) from None
        if chat.stream:
            # Starlette cancels the stream when the client leaves, but only once it has
            # started; the watcher covers a client that leaves before the first byte.
            answer.watch(request)
            return StreamingResponse(answer.stream(request, chat.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await answer.whole(request)

    @app.post("/v1/moderations", openapi_extra=_request_body(ModerationBody))
    async def moderations(request: Request):
        authorize(request)
        mod = await work(moderation_input, await read_body(request, settings.max_body_bytes))
        check_model(mod.model)
        pixels = np.stack([await pixel_values(ref) for ref in mod.images])
        try:
            verdicts = await run_in_threadpool(engine.moderate, pixels)
        except BadRequest as e:  # a checkpoint without safety modules
            raise bad_request(e.message, e.param, e.code) from None
        for v in verdicts:
            metrics.verdict(v)
        return {"id": responses.new_id("modr"), "model": settings.model_name,
                "results": [responses.moderation_result(verdicts)]}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [responses.model_card(settings.model_name)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        check_model(model_id, None)
        return responses.model_card(model_id)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "auth": settings.api_key is not None,
                "safety_off_allowed": settings.allow_safety_off, "risk_levels": RISK_LEVELS,
                "risk_types": RISK_TYPES, **engine.stats().as_dict()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(STATIC, "index.html"), headers={"Cache-Control": "no-cache"})

    samples = sorted(name for name in os.listdir(EXAMPLES) if name.endswith(".png"))

    @app.get("/examples.json", include_in_schema=False)
    async def examples():
        return [{"name": name[:-4], "url": f"/examples/{name}"} for name in samples]

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/examples", StaticFiles(directory=EXAMPLES), name="examples")
    return app


def _engine_request(chat: ChatInput, pixels, settings: ServeSettings) -> EngineRequest:
    conversation = Conversation(chat.turns, chat.system, chat.image_turn)
    return EngineRequest(pixel_values=pixels, prompt=conversation,
                         max_tokens=chat.max_tokens or settings.default_max_tokens,
                         temperature=chat.temperature, top_p=chat.top_p, top_k=chat.top_k,
                         seed=secrets.randbelow(2**31) if chat.seed is None else chat.seed,
                         safety=chat.safety, presence_penalty=chat.presence_penalty,
                         frequency_penalty=chat.frequency_penalty, logprobs=chat.logprobs, stop=chat.stop,
                         json_schema=chat.json_schema)


def _bad_engine_request(e: BadRequest, chat: ChatInput, settings: ServeSettings) -> APIError:
    """The engine's refusal as a 400, by its code: a prompt that does not fit the context
    names max_tokens if the request gave it, else the messages and the server's default."""
    if e.code != CONTEXT_LENGTH:
        return bad_request(e.message, e.param, e.code)
    if chat.max_tokens is None:
        return bad_request(f"{e.message} (max_tokens was not given: the server's default is "
                           f"{settings.default_max_tokens}; send a smaller max_tokens)", "messages", e.code)
    return bad_request(e.message, "max_tokens", e.code)


def _request_body(model) -> dict:
    """The OpenAPI request body of a handler that reads its body itself (see `_openapi`)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema of the routes, plus the request bodies' models: the handlers read and
    check their bodies themselves (bounded, in the worker pool), so FastAPI does not see them."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(ChatBody, "validation"), (ModerationBody, "validation")],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema
