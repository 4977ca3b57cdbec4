"""Request bodies of `/v1/chat/completions` and `/v1/moderations`: OpenAI's format, checked.

    limits = Limits(vocab_size=32064, max_prompt_chars=65536)   # the served model's
    chat = parse_chat(json_body, limits)        # ChatInput, or APIError 400 naming the field
    moderation = parse_moderation(body, limits, max_images=16)

The pydantic models (`ChatBody`, `ModerationBody`) are both the validation and the schema the
server publishes at `/openapi.json`: `extra="forbid"`, so a misspelt or unknown field is named
in the error (as OpenAI's API does) instead of being silently ignored, and every string, list
and number is bounded. What depends on the model is checked against `Limits` (top_k at most
the vocabulary; a prompt no longer than the context could hold), and prompt + max_tokens
against the context by the engine (and a `response_format` schema by its grammar compiler).
Fields of OpenAI's API that this model cannot honour (`tools`, functions, audio, ...) are
refused by name unless they carry their neutral value. Every error names its exact place
(`messages[0].content[1].image_url.url`).

Conversation shape: `system` / `developer` messages (their texts, joined, replace the
template's system text), then user and assistant turns in any number from a user turn to the
last question (consecutive messages of one role are one turn, their texts joined by a newline),
with at most one image in the whole conversation, in any user turn (LLaVA-1.5 and its safety
verdict are for one image; the template puts the image in front of its turn's text).

Extensions (vLLM-style extra fields): `top_k` (0 = off), `safety` (false: plain LLaVA, no
verdict or hint; the server may forbid it).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

import pydantic
from pydantic import ConfigDict, Field

from safevlm_jax.data.records import GPT, HUMAN, Turn
from safevlm_jax.inference.constraints import ANY_OBJECT
from safevlm_jax.inference.logits import TOP_LOGPROBS
from safevlm_jax.inference.requests import MAX_TOKENS, SEEDS
from safevlm_jax.inference.stops import MAX_STOP_CHARS, MAX_STOPS
from safevlm_jax.serve.errors import bad_request, param_path

# field -> the values that mean "not used" (anything else is refused)
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"),
               "functions": (None, []), "function_call": (None, "none"),
               "parallel_tool_calls": (None,), "logit_bias": (None, {}),
               "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
               "reasoning_effort": (None,), "web_search_options": (None,)}
MAX_CHOICES = 8
NAME_CHARS, MAX_PARTS, MAX_MESSAGES = 256, 64, 256
# the characters of every bounded string of a body but its prompt: model, user, name, metadata
FIELD_CHARS = 3 * NAME_CHARS + 16 * (64 + 512) + 4 * MAX_PARTS
Name = Annotated[str, Field(max_length=NAME_CHARS)]


@dataclasses.dataclass(frozen=True)
class Limits:
    """The served model's bounds: top_k <= vocab_size (its logits); a prompt (all text parts)
    of at most max_prompt_chars characters (`data.tokenizer.max_prompt_chars` of its context)."""

    vocab_size: int
    max_prompt_chars: int

    @property
    def max_separators(self) -> int:
        """The most ',' and ':' bytes a body this server can answer holds: its prompt (each
        character could be one), its other strings and its structure."""
        return self.max_prompt_chars + FIELD_CHARS + 1024


class _Strict(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(description="data:image/<type>;base64,<data>, or an http(s) URL on a domain the server "
                                 "fetches from (--allowed_media_domains); no file is read")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]
Parts = Annotated[list[Part], Field(min_length=1, max_length=MAX_PARTS)]
TextParts = Annotated[list[TextPart], Field(min_length=1, max_length=MAX_PARTS)]


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: str | TextParts = Field(description="replaces the template's system text")
    name: Name | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | Parts = Field(description="text, or text parts and at most one image part (in the "
                                             "whole conversation)")
    name: Name | None = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | TextParts = Field(description="an earlier answer")
    name: Name | None = None


ROLES = ("system", "developer", "user", "assistant")
Message = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


class StreamOptions(_Strict):
    include_usage: bool = False


class TextFormat(_Strict):
    type: Literal["text"]


class JSONObjectFormat(_Strict):
    type: Literal["json_object"]


class JSONSchema(_Strict):
    name: Annotated[str, Field(max_length=64)]
    description: Annotated[str, Field(max_length=NAME_CHARS)] | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="a JSON schema")
    strict: bool | None = None


class JSONSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]
Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class ChatBody(_Strict):
    model: Name | None = None
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES,
                                    description="system/developer, then user and assistant turns ending "
                                                "with a user turn")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_TOKENS, description="0: off; at most the vocabulary")
    seed: int | None = Field(None, ge=SEEDS[0], le=SEEDS[1])
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="choices, each with its own seed")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    safety: bool = Field(True, description="false: plain LLaVA, no verdict or hint")
    user: Name | None = None  # accepted and ignored, as by vLLM
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = \
        Field(None, max_length=16)
    store: bool | None = None


class ModerationBody(_Strict):
    model: Name | None = None
    input: str | Annotated[list[str | Part], Field(min_length=1, max_length=MAX_PARTS)]


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image part: its URL (checked later, `media.data_url_bytes`) and where it was."""

    url: str
    param: str


@dataclasses.dataclass(frozen=True)
class ChatInput:
    """A checked chat request: turns alternating user (HUMAN) and assistant (GPT) from a user
    turn to the question; system: the system messages' text (None: none given); image_turn:
    the index in `turns` of the user turn holding `image`. max_tokens None: the server's
    default; seed None: random."""

    model: str | None
    turns: tuple[Turn, ...]
    system: str | None
    image: ImageRef | None
    image_turn: int
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stream: bool
    include_usage: bool
    safety: bool
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    json_schema: dict | None = None


@dataclasses.dataclass(frozen=True)
class ModerationInput:
    model: str | None
    images: list[ImageRef]
    texts: list[str]


def parse_chat(body: Any, limits: Limits) -> ChatInput:
    """A decoded JSON body -> ChatInput; APIError 400 naming the field at fault."""
    chat = _validate(ChatBody, _refuse_unsupported(body))
    if chat.max_tokens is not None and chat.max_completion_tokens is not None \
            and chat.max_tokens != chat.max_completion_tokens:
        raise bad_request("give max_tokens or max_completion_tokens, not two different values",
                          "max_completion_tokens")
    if chat.top_k and chat.top_k > limits.vocab_size:
        raise bad_request(f"top_k must be at most the vocabulary size, {limits.vocab_size}; got {chat.top_k}",
                          "top_k")
    if chat.top_logprobs and not chat.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    system, turns, images = _conversation(chat.messages)
    if len(images) > 1:
        raise bad_request(f"at most one image per conversation (LLaVA-1.5 and its safety verdict read one "
                          f"image); got {len(images)}", images[1][1].param, "too_many_images")
    chars = [len(m.content) if isinstance(m.content, str) else sum(len(getattr(p, "text", "")) for p in m.content)
             for m in chat.messages]  # the longest message is named
    _check_text("".join(t.value for t in turns) + (system or ""), limits,
                f"messages[{chars.index(max(chars))}].content")
    return ChatInput(model=chat.model, turns=turns, system=system, image=images[0][1] if images else None,
                     image_turn=images[0][0] if images else 0,
                     max_tokens=chat.max_tokens or chat.max_completion_tokens,
                     temperature=1.0 if chat.temperature is None else chat.temperature,
                     top_p=1.0 if chat.top_p is None else chat.top_p, top_k=chat.top_k or 0,
                     seed=chat.seed, stream=chat.stream,
                     include_usage=bool(chat.stream_options and chat.stream_options.include_usage),
                     safety=chat.safety, n=chat.n or 1, stop=_stops(chat.stop), logprobs=bool(chat.logprobs),
                     top_logprobs=chat.top_logprobs or 0, presence_penalty=chat.presence_penalty or 0.0,
                     frequency_penalty=chat.frequency_penalty or 0.0, json_schema=_json_schema(chat.response_format))


def parse_moderation(body: Any, limits: Limits, max_images: int) -> ModerationInput:
    """`input` as content parts (text and image_url) -> ModerationInput; at least one image,
    at most `max_images`."""
    mod = _validate(ModerationBody, body)
    texts, images = _parts([mod.input] if isinstance(mod.input, str) else mod.input, "input")
    if not images:
        raise bad_request("the safety head judges images: give input as content parts with at least "
                          "one {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:...\"}}; "
                          "text alone does not change its verdict", "input", "image_required")
    _check_text("\n".join(texts), limits, "input")
    if len(images) > max_images:
        raise bad_request(f"at most {max_images} images per moderation request, got {len(images)}",
                          "input", "too_many_images")
    return ModerationInput(mod.model, images, texts)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    """OpenAI's `stop` (a string or a list; empty strings stop nothing) as a tuple."""
    return tuple(s for s in ([stop] if isinstance(stop, str) else stop or []) if s)


def _json_schema(fmt) -> dict | None:
    """The schema the answer must follow: json_object: any object; json_schema: its schema."""
    if isinstance(fmt, JSONObjectFormat):
        return ANY_OBJECT
    if isinstance(fmt, JSONSchemaFormat):
        if fmt.json_schema.schema_ is None:
            raise bad_request("response_format.json_schema.schema is required", "response_format.json_schema.schema",
                              "missing_required_parameter")
        return fmt.json_schema.schema_
    return None


def _conversation(messages: list) -> tuple[str | None, tuple[Turn, ...], list[tuple[int, ImageRef]]]:
    """Validated messages -> (the system text or None, the turns, (turn index, image) each)."""
    system, turns, images = [], [], []  # turns: [role, texts]
    for i, message in enumerate(messages):
        content, where = message.content, f"messages[{i}].content"
        texts, refs = ([content], []) if isinstance(content, str) else _parts(content, where)
        if message.role in ("system", "developer"):
            system.append("\n".join(texts))
            continue
        role = HUMAN if message.role == "user" else GPT
        if not turns or turns[-1][0] != role:
            turns.append((role, []))
        turns[-1][1].extend(texts)
        images += [(len(turns) - 1, ref) for ref in refs]
    if not turns or turns[0][0] != HUMAN or turns[-1][0] != HUMAN:
        roles = [m.role for m in messages]
        raise bad_request(f"the conversation must go from a user message to a user message (the question to "
                          f"answer), after any system messages; got roles {_brief(roles)}", "messages",
                          "unsupported_conversation")
    return ("\n".join(system) if system else None), tuple(Turn(r, "\n".join(t)) for r, t in turns), images


def _parts(parts: list[str | TextPart | ImagePart], where: str) -> tuple[list[str], list[ImageRef]]:
    """Validated content parts (a string is a text) -> their texts and image references, in order."""
    texts, images = [], []
    for i, part in enumerate(parts):
        if isinstance(part, (str, TextPart)):
            texts.append(part if isinstance(part, str) else part.text)
        else:
            images.append(ImageRef(part.image_url.url, f"{where}[{i}].image_url.url"))
    return texts, images


def _check_text(text: str, limits: Limits, param: str) -> None:
    if len(text) > limits.max_prompt_chars:  # refused before tokenizing: it could not fit
        raise bad_request(f"the prompt has {len(text)} characters; the model's context holds at most "
                          f"{limits.max_prompt_chars}", param, "context_length_exceeded")


def _refuse_unsupported(body: Any) -> Any:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}",
                          None, "invalid_body")
    for name, neutral in UNSUPPORTED.items():
        if name in body and not _neutral(body[name], neutral):
            shown = ", ".join(repr(v) for v in neutral if v is not None) or "absent"
            raise bad_request(f"{name!r} is not supported by this server (allowed: {shown}; got "
                              f"{_brief(body[name])})", name, "unsupported_parameter")
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
        # a union reports every branch's error: the deepest names the place best
        # (and of two as deep, one that is not "wrong type": the branch the value was meant for)
        error = max(e.errors(include_url=False),
                    key=lambda err: (len(_loc(err["loc"])), not err["type"].endswith("_type")))
        raise _refusal(error) from None


def _refusal(error: dict):
    """pydantic's error -> the APIError 400 naming its field, with OpenAI's codes."""
    loc, kind, got = _loc(error["loc"]), error["type"], error.get("input")
    param = param_path(loc)
    if kind == "extra_forbidden":
        return bad_request(f"unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if loc[:1] == ("messages",) and len(loc) == 2 and kind.startswith("union_tag"):
        tag = got.get("role") if isinstance(got, dict) else None
        return bad_request(f"{param}.role: {_brief(tag)} is not a role this server answers: system, developer, "
                           f"user or assistant (it has no tools)", f"{param}.role", "unsupported_conversation")
    if kind.startswith("union_tag") and ("content" in loc or "input" in loc):
        tag = got.get("type") if isinstance(got, dict) else None
        return bad_request(f"{param}: content part type {_brief(tag)} is not supported; use 'text' or "
                           f"'image_url'", f"{param}.type", "unsupported_content_type")
    if "image_url" in loc and kind in ("missing", "string_type", "model_type"):
        url = f"{param}.url" if loc[-1] == "image_url" else param
        return bad_request(f"{url}: give the image as {{\"url\": \"data:image/<type>;base64,<data>\"}}", url,
                           "invalid_image_url")
    if kind == "missing":
        return bad_request(f"missing required field {param!r}", param, "missing_required_parameter")
    return bad_request(f"{param}: {error['msg']} (got {_brief(got)})", param)


def _loc(loc: tuple) -> tuple:
    """pydantic's error location without its union branch labels ('str', 'list[...]'), the
    role tag that follows a message's index and the tag that follows a content part's index ((..., 0, 'text', 'text') -> (..., 0, 'text'))."""
    out, tag_seen = [], False
    for i, part in enumerate(loc):
        if isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool")
                                      or part.startswith("constrained-")):
            continue
        if len(out) == 2 and out[0] == "messages" and part in ROLES and i + 1 < len(loc):
            continue  # the message's role tag
        in_part = len(out) >= 2 and isinstance(out[-1], int) and out[-2] in ("content", "input")
        if in_part and not tag_seen and part in ("text", "image_url") and i + 1 < len(loc):
            tag_seen = True
            continue
        out.append(part)
    return tuple(out)


def _brief(value: Any) -> str:
    """A value for an error message, at most ~80 characters, whatever its size."""
    if isinstance(value, str):
        return repr(value[:80]) + ("..." if len(value) > 80 else "")
    if isinstance(value, int) and abs(value) >= 10**20:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value) if not isinstance(value, (list, dict)) or len(value) < 20 else type(value).__name__
    return text[:80]
