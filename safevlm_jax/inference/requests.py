"""What a caller of the engine (`inference.engine`) holds: the request and its sampling rule,
its typed events, the handle `submit` returns, why a request ended (`FinishReason`), and the
two ways a request is turned away before it is accepted (`QueueFull`, `EngineClosed`; bad
input is `inference.errors.BadRequest`). Host types only: no JAX."""

from __future__ import annotations

import dataclasses
import enum
import threading
from typing import Callable, ClassVar, Union

import numpy as np

from safevlm_jax.data.template import PROMPT_FORMATS
from safevlm_jax.inference.errors import BadRequest, is_finite, is_int, is_real
from safevlm_jax.inference.stops import MAX_STOP_CHARS, MAX_STOPS
from safevlm_jax.safety.prompt import Conversation
from safevlm_jax.safety.verdict import Verdict


class FinishReason(enum.StrEnum):
    """Why a request ended (a str: `reason == "stop"` holds, and it prints as "stop")."""

    STOP = "stop"  # EOS
    LENGTH = "length"  # max_tokens
    BLOCKED = "blocked"  # the policy answered with its refusal; nothing was generated
    CANCELLED = "cancelled"  # Handle.cancel(), or shutdown without draining
    ERROR = "error"  # something failed for this request (DoneEvent.error says what)


MAX_TOKENS = 2**31 - 1  # max_tokens and top_k become int32 on the device
SEEDS = (-2**63, 2**63 - 1)  # int64, as OpenAI's and vLLM's `seed`; a row's key uses seed mod 2**32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling rule (vLLM's name): temperature >= 0 (0 = greedy), top_k >= 0
    (0 = off), top_p in (0, 1] (1 = off), seed (an integer in `SEEDS`); presence_penalty and
    frequency_penalty in [-2, 2] (OpenAI's, `logits.penalize`); logprobs: report each token's
    log-probability and the top ones (`logits.TOP_LOGPROBS`)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False

    def check(self, vocab_size: int = MAX_TOKENS) -> "SamplingParams":
        """Itself, or BadRequest naming the field out of range (top_k is at most `vocab_size`,
        the model's logits)."""
        t, k, p, s = self.temperature, self.top_k, self.top_p, self.seed
        if not (is_finite(t) and t >= 0):
            raise BadRequest(f"temperature must be a finite number >= 0, got {_shown(t)}", "temperature")
        if not (is_int(k) and 0 <= k <= vocab_size):
            raise BadRequest(f"top_k must be an integer in [0, {vocab_size}] (the vocabulary), got {_shown(k)}",
                             "top_k")
        if not (is_real(p) and 0 < p <= 1):
            raise BadRequest(f"top_p must be in (0, 1], got {_shown(p)}", "top_p")
        if not (is_int(s) and SEEDS[0] <= s <= SEEDS[1]):
            raise BadRequest(f"seed must be an integer in [-2**63, 2**63 - 1], got {_shown(s)}", "seed")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (is_finite(value) and -2 <= value <= 2):
                raise BadRequest(f"{name} must be a number in [-2, 2], got {_shown(value)}", name)
        return self


def _shown(x) -> str:
    """x for an error message: a huge integer by its size (its digits may be too many for str)."""
    if is_int(x) and abs(x) >= 10**20:
        return f"an integer of {int(x).bit_length()} bits"
    return f"{x!r:.40}"


class QueueFull(RuntimeError):
    """`max_queue` requests are waiting; try again later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and accepts no request."""


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    """pixel_values: [S, S, 3] f32, preprocessed (`data.images.preprocess`), or None (text
    only); prompt: the user's question (plain text) or a whole `Conversation`; temperature 0
    = greedy; top_k 0 and top_p 1 = off (both may be given); seed: the sampling seed;
    safety: run the verdict and its hint; presence_penalty, frequency_penalty, logprobs:
    `SamplingParams`; stop: strings that end the answer (not included in it, at most
    `stops.MAX_STOPS`); json_schema: a JSON schema the answer must follow (constrained
    decoding, `constraints`; `constraints.ANY_OBJECT` for any JSON object)."""

    pixel_values: np.ndarray | None
    prompt: str | Conversation
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    safety: bool = True
    prompt_format: str = "llava"
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    stop: tuple[str, ...] = ()
    json_schema: dict | None = None

    @property
    def conversation(self) -> Conversation:
        return self.prompt if isinstance(self.prompt, Conversation) else Conversation.of(self.prompt)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed, self.presence_penalty,
                              self.frequency_penalty, self.logprobs)

    def check(self, vocab_size: int = MAX_TOKENS) -> None:
        """BadRequest naming the first field that is not as documented."""
        if self.prompt_format not in PROMPT_FORMATS:
            raise BadRequest(f"unknown prompt_format {self.prompt_format!r}; known: {list(PROMPT_FORMATS)}",
                             "prompt_format")
        if not isinstance(self.prompt, (str, Conversation)):
            raise BadRequest(f"prompt must be a string or a Conversation, got {type(self.prompt).__name__}",
                             "prompt")
        if not is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_TOKENS:
            raise BadRequest(f"max_tokens must be an integer in [1, {MAX_TOKENS}], got {_shown(self.max_tokens)}",
                             "max_tokens")
        self.sampling.check(vocab_size)
        if not (isinstance(self.stop, tuple) and len(self.stop) <= MAX_STOPS
                and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop)):
            raise BadRequest(f"stop must be at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                             f"characters", "stop")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise BadRequest("json_schema must be a JSON schema (an object)", "response_format")


@dataclasses.dataclass(frozen=True)
class VerdictEvent:
    """The request's verdict (None: safety off or no image), the policy's action, and the
    prompt ids it was admitted with (the hint included; empty when blocked or failed)."""

    kind: ClassVar[str] = "verdict"
    verdict: Verdict | None
    action: str | None
    prompt_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class TextEvent:
    """New answer text (a delta), the token ids it came from and, when the request asked,
    their log-probabilities: (token, logprob, top ids, top logprobs) each."""

    kind: ClassVar[str] = "text"
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[tuple, ...] = ()


@dataclasses.dataclass(frozen=True)
class DoneEvent:
    """The request's end: finish_reason, prompt_tokens, completion_tokens (EOS included),
    error (for ERROR), timings (seconds from submit: queue_s to its row, ttft_s to the first
    token, total_s), token_ids: generated ids no TextEvent carried (EOS, a held-back tail)."""

    kind: ClassVar[str] = "done"
    finish_reason: FinishReason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    token_ids: tuple[int, ...] = ()


EngineEvent = Union[VerdictEvent, TextEvent, DoneEvent]


class Handle:
    """One accepted request: what its events said so far (verdict, action, prompt_ids, text,
    token_ids: the generated ids, EOS included; done_event), `cancel()` and `wait()`. The
    engine's thread records each event here before the caller's `on_event` sees it."""

    def __init__(self, request_id: int, request: EngineRequest, wake: Callable[[], None]):
        self.id, self.request, self._wake = request_id, request, wake
        self.verdict: Verdict | None = None
        self.action: str | None = None
        self.prompt_ids: list[int] = []
        self.text = ""
        self.token_ids: list[int] = []
        self.done_event: DoneEvent | None = None
        self._cancelled, self._done = threading.Event(), threading.Event()

    def record(self, event: EngineEvent) -> None:
        if isinstance(event, VerdictEvent):
            self.verdict, self.action, self.prompt_ids = event.verdict, event.action, list(event.prompt_ids)
        elif isinstance(event, TextEvent):
            self.text += event.text
            self.token_ids += event.token_ids
        else:
            self.token_ids += event.token_ids
            self.done_event = event

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.done_event and self.done_event.finish_reason

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ends the request at the engine's next turn (its row is freed; "cancelled")."""
        self._cancelled.set()
        self._wake()

    def wait(self, timeout: float | None = None) -> bool:
        """True once "done" was delivered."""
        return self._done.wait(timeout)

    def _finished(self) -> None:
        self._done.set()
