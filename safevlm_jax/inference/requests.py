"""What a caller of the engine (`inference.engine`) holds: the request, its events, the
handle `submit` returns, and the two ways a request is turned away before it is accepted
(`QueueFull`, `EngineClosed`; bad input is `inference.errors.BadRequest`)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import threading
from typing import Callable

import numpy as np

from safevlm_jax.data.template import PROMPT_FORMATS
from safevlm_jax.inference.errors import BadRequest
from safevlm_jax.safety.verdict import Verdict

FINISH_REASONS = ("stop", "length", "blocked", "cancelled", "error")
MAX_TOKENS = 2**31 - 1  # max_tokens and top_k become int32 on the device
SEEDS = (-2**63, 2**63 - 1)  # int64, as OpenAI's and vLLM's `seed`


class QueueFull(RuntimeError):
    """`max_queue` requests are waiting; try again later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and accepts no request."""


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    """pixel_values: [S, S, 3] f32, preprocessed (`data.images.preprocess`), or None (text
    only); prompt: the user's question, plain text; temperature 0 = greedy; top_k 0 and top_p
    1 = off; seed: the sampling seed (taken mod 2**32); safety: run the verdict and its hint."""

    pixel_values: np.ndarray | None
    prompt: str
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    safety: bool = True
    prompt_format: str = "llava"

    def check(self, vocab_size: int = MAX_TOKENS) -> None:
        """BadRequest naming the first field that is not as documented; top_k is at most
        `vocab_size` (the model's logits)."""
        if self.prompt_format not in PROMPT_FORMATS:
            raise BadRequest(f"unknown prompt_format {self.prompt_format!r}; known: {list(PROMPT_FORMATS)}")
        if not isinstance(self.prompt, str):
            raise BadRequest(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_TOKENS:
            raise BadRequest(f"max_tokens must be an integer in [1, {MAX_TOKENS}], got {_shown(self.max_tokens)}")
        if not (_is_finite(self.temperature) and self.temperature >= 0):
            raise BadRequest(f"temperature must be a number >= 0, got {_shown(self.temperature)}")
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise BadRequest(f"top_p must be in (0, 1], got {_shown(self.top_p)}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= vocab_size:
            raise BadRequest(f"top_k must be an integer in [0, {vocab_size}] (the vocabulary), "
                             f"got {_shown(self.top_k)}")
        if not _is_int(self.seed) or not SEEDS[0] <= self.seed <= SEEDS[1]:
            raise BadRequest(f"seed must be an integer in [-2**63, 2**63 - 1], got {_shown(self.seed)}")


@dataclasses.dataclass(frozen=True)
class EngineEvent:
    """kind "verdict": verdict, action; "text": text (a delta); "done": finish_reason (one of
    FINISH_REASONS), prompt_tokens, completion_tokens (EOS included), error (for "error"),
    timings (seconds from submit: queue_s to the slot, ttft_s to the first token, total_s)."""

    kind: str
    verdict: Verdict | None = None
    action: str | None = None
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    timings: dict | None = None


class Handle:
    """One accepted request: what it received so far (token_ids: the generated ids, EOS
    included; prompt_ids: the prompt as fed, hint included), `cancel()` and `wait()`."""

    def __init__(self, request_id: int, request: EngineRequest, wake: Callable[[], None]):
        self.id, self.request, self._wake = request_id, request, wake
        self.token_ids: list[int] = []
        self.prompt_ids: list[int] = []
        self.verdict: Verdict | None = None
        self.action: str | None = None
        self.text = ""
        self.done_event: EngineEvent | None = None
        self._cancelled, self._done = threading.Event(), threading.Event()

    @property
    def finish_reason(self) -> str | None:
        return self.done_event and self.done_event.finish_reason

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Frees the request's slot at the engine's next turn ("done": cancelled)."""
        self._cancelled.set()
        self._wake()

    def wait(self, timeout: float | None = None) -> bool:
        """True once "done" was delivered."""
        return self._done.wait(timeout)


def _shown(x) -> str:
    """x for an error message: a huge integer by its size (its digits may be too many for str)."""
    if _is_int(x) and abs(x) >= 10**20:
        return f"an integer of {int(x).bit_length()} bits"
    return f"{x!r:.40}"


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_finite(x) -> bool:
    try:
        return _is_real(x) and math.isfinite(x)
    except OverflowError:  # an integer beyond every float
        return False
