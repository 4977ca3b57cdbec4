"""Request bodies of `/v1/chat/completions` and `/v1/moderations`: OpenAI's format, checked.

    chat = parse_chat(json_body)        # ChatInput, or APIError 400 naming the field
    moderation = parse_moderation(body) # ModerationInput

Scalars are checked by pydantic models with `extra="forbid"`, so a misspelt or unknown field
is named in the error (as OpenAI's API does) instead of being silently ignored. Fields of
OpenAI's API that this server cannot honour (`n > 1`, `tools`, `logprobs`, `stop`, ...) are
refused by name unless they carry their neutral value. Messages are parsed by hand, so each
error names its exact place (`messages[0].content[1].image_url.url`).

Conversation shape: one user turn (text parts and at most one image, which the template puts
first): the prompt templates of SafeVLM have one user turn and their own system text, and the
safety verdict is defined for one image.

Extensions (vLLM-style extra fields): `top_k` (0 = off), `safety` (false: plain LLaVA, no
verdict or hint; the server may forbid it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pydantic
from pydantic import ConfigDict, Field

from safevlm_jax.serve.errors import bad_request

# field -> the values that mean "not used" (anything else is refused)
UNSUPPORTED = {"n": (None, 1), "tools": (None, []), "tool_choice": (None, "none"),
               "functions": (None, []), "function_call": (None, "none"),
               "parallel_tool_calls": (None,), "logprobs": (None, False), "top_logprobs": (None, 0),
               "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
               "stop": (None, [], ""), "response_format": (None, {"type": "text"}),
               "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
               "reasoning_effort": (None,), "web_search_options": (None,)}


class _Strict(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatBody(_Strict):
    model: str | None = None
    messages: list[Any] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    safety: bool = True
    user: str | None = None  # accepted and ignored, as by vLLM
    metadata: dict[str, str] | None = None
    store: bool | None = None


class ModerationBody(_Strict):
    model: str | None = None
    input: str | list[Any]


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image part: its URL (checked later, `media.data_url_bytes`) and where it was."""

    url: str
    param: str


@dataclasses.dataclass(frozen=True)
class ChatInput:
    """A checked chat request. max_tokens None: the server's default; seed None: random."""

    model: str | None
    prompt: str
    image: ImageRef | None
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stream: bool
    include_usage: bool
    safety: bool


@dataclasses.dataclass(frozen=True)
class ModerationInput:
    model: str | None
    images: list[ImageRef]
    texts: list[str]


def parse_chat(body: Any) -> ChatInput:
    """A decoded JSON body -> ChatInput; APIError 400 naming the field at fault."""
    chat = _validate(ChatBody, _refuse_unsupported(body))
    if chat.max_tokens is not None and chat.max_completion_tokens is not None \
            and chat.max_tokens != chat.max_completion_tokens:
        raise bad_request("give max_tokens or max_completion_tokens, not two different values",
                          "max_completion_tokens")
    prompt, image = _one_user_turn(chat.messages)
    return ChatInput(model=chat.model, prompt=prompt, image=image,
                     max_tokens=chat.max_tokens or chat.max_completion_tokens,
                     temperature=1.0 if chat.temperature is None else chat.temperature,
                     top_p=1.0 if chat.top_p is None else chat.top_p, top_k=chat.top_k or 0,
                     seed=chat.seed, stream=chat.stream,
                     include_usage=bool(chat.stream_options and chat.stream_options.include_usage),
                     safety=chat.safety)


def parse_moderation(body: Any, max_images: int) -> ModerationInput:
    """`input` as content parts (text and image_url) -> ModerationInput; at least one image,
    at most `max_images`."""
    mod = _validate(ModerationBody, body)
    if isinstance(mod.input, str) or all(isinstance(x, str) for x in mod.input):
        raise bad_request("the safety head judges images: give input as content parts with at least "
                          "one {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:...\"}}; "
                          "text alone does not change its verdict", "input", "image_required")
    texts, images = _parts(mod.input, "input")
    if not images:
        raise bad_request("input has no image_url part; the safety head judges images", "input",
                          "image_required")
    if len(images) > max_images:
        raise bad_request(f"at most {max_images} images per moderation request, got {len(images)}",
                          "input", "too_many_images")
    return ModerationInput(mod.model, images, texts)


def _refuse_unsupported(body: Any) -> Any:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}",
                          None, "invalid_body")
    for name, neutral in UNSUPPORTED.items():
        if name in body and not _neutral(body[name], neutral):
            shown = ", ".join(repr(v) for v in neutral if v is not None) or "absent"
            raise bad_request(f"{name!r} is not supported by this server (allowed: {shown}; got "
                              f"{body[name]!r})", name, "unsupported_parameter")
    return {k: v for k, v in body.items() if k not in UNSUPPORTED}


def _neutral(value: Any, neutral: tuple) -> bool:
    """value is one of `neutral` (True is not 1 here; 0.0 is 0)."""
    return any(value is v if v is None else
               isinstance(value, bool) == isinstance(v, bool) and value == v for v in neutral)


def _validate(model: type[pydantic.BaseModel], body: Any):
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}",
                          None, "invalid_body")
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        param = _param(error["loc"])
        if error["type"] == "extra_forbidden":
            raise bad_request(f"unrecognized request argument supplied: {param}", param,
                              "unknown_parameter") from None
        if error["type"] == "missing":
            raise bad_request(f"missing required field {param!r}", param, "missing_required_parameter") from None
        raise bad_request(f"{param}: {error['msg']} (got {error.get('input')!r:.80})", param) from None


def _param(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'; pydantic's union branch names
    (e.g. 'list[any]', 'str') are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" not in part and part not in ("str", "int", "float", "bool"):
            out += f".{part}" if out else part
    return out


def _one_user_turn(messages: list) -> tuple[str, ImageRef | None]:
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    for i, (m, role) in enumerate(zip(messages, roles)):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise bad_request(f"messages[{i}]: unsupported field(s) {extra}", f"messages[{i}].{extra[0]}",
                              "unsupported_parameter")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad_request(f"messages[{i}].role must be one of system, user, assistant; got {role!r}",
                              f"messages[{i}].role")
    if roles != ["user"]:
        raise bad_request(f"this server answers one user turn: send exactly one message with role "
                          f"'user' (SafeVLM's prompt template has its own system text); got roles "
                          f"{roles}", "messages", "unsupported_conversation")
    content = messages[0].get("content")
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list) or not content:
        raise bad_request("messages[0].content must be a string or a non-empty list of content parts",
                          "messages[0].content")
    texts, images = _parts(content, "messages[0].content")
    if len(images) > 1:
        raise bad_request(f"at most one image per request (the safety verdict is for one image); "
                          f"got {len(images)}", images[1].param, "too_many_images")
    return "\n".join(texts), images[0] if images else None


def _parts(parts: list, where: str) -> tuple[list[str], list[ImageRef]]:
    """Content parts -> their texts and image references, in order."""
    texts, images = [], []
    for i, part in enumerate(parts):
        at = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            _keys(part, {"type", "text"}, at)
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{at}.text must be a string", f"{at}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            _keys(part, {"type", "image_url"}, at)
            ref = part.get("image_url")
            if isinstance(ref, dict):
                _keys(ref, {"url", "detail"}, f"{at}.image_url")
                ref = ref.get("url")
            if not isinstance(ref, str) or not ref:
                raise bad_request(f"{at}.image_url.url is missing; give a data:image/...;base64 URL",
                                  f"{at}.image_url.url", "invalid_image_url")
            images.append(ImageRef(ref, f"{at}.image_url.url"))
        else:
            raise bad_request(f"{at}: content part type {kind!r} is not supported; use 'text' or "
                              f"'image_url'", f"{at}.type", "unsupported_content_type")
    return texts, images


def _keys(obj: dict, allowed: set[str], at: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise bad_request(f"{at}: unrecognized field(s) {extra}", f"{at}.{extra[0]}", "unknown_parameter")

