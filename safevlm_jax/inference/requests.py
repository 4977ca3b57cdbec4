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

    def check(self) -> None:
        """BadRequest naming the first field that is not as documented."""
        if self.prompt_format not in PROMPT_FORMATS:
            raise BadRequest(f"unknown prompt_format {self.prompt_format!r}; known: {list(PROMPT_FORMATS)}")
        if not isinstance(self.prompt, str):
            raise BadRequest(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise BadRequest(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (_is_real(self.temperature) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise BadRequest(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise BadRequest(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not _is_int(self.seed):
            raise BadRequest(f"seed must be an integer, got {self.seed!r}")


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


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
