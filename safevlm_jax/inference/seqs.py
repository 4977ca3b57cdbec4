"""One request's host state in the engine (`Seq`) and its stages (`Status`), as the scheduler
(`inference.scheduler`) moves it through them and the executor reads it."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from safevlm_jax.inference.requests import EngineRequest
from safevlm_jax.safety.verdict import Verdict


class Status(enum.Enum):
    WAITING = "waiting"  # for its verdict and admission
    READY = "ready"  # admitted, waiting for a row
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


@dataclasses.dataclass(eq=False)
class Seq:
    """One request's state. image: its image's hash (None: text only); features: what the
    engine keeps of its image (opaque here); computed: prompt tokens prefilled so far."""

    id: int
    request: EngineRequest
    image: str | None
    detok: Any  # a Detokenizer: token ids -> text deltas
    submitted: float
    status: Status = Status.WAITING
    verdict: Verdict | None = None
    features: Any = None
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0
    row: int | None = None
    generated: list[int] = dataclasses.field(default_factory=list)
    reported: int = 0  # generated tokens carried by events so far
    admitted: float | None = None
    first_token: float | None = None
    cancelled: bool = False
    said_verdict: bool = False
    stops: Any = None  # a StopStrings, or None
    grammar: Any = None  # a constraints.RowGrammar, or None
    logprobs: list = dataclasses.field(default_factory=list)  # per generated token, when asked
    stopped: bool = False  # a stop string ended it
    leader: "Seq | None" = None  # the first choice of its request (n > 1): it begins after its prefill
    shared: bool = False  # one of several choices
    whole_hit: bool = False  # a cached prefix holds its prompt but the last token: inserted as it is

    @property
    def deferred(self) -> bool:
        """Its first answer token comes from a decode step (`inference.scheduler`)."""
        return self.grammar is not None or self.request.logprobs or self.shared or self.whole_hit

    @property
    def use_safety(self) -> bool:
        """Its image positions hold the safety tokens, then the image (else the image alone)."""
        return self.request.safety and self.image is not None

    @property
    def cached(self) -> int:
        """Tokens whose keys and values are in its row (the last sampled one is not yet)."""
        return len(self.prompt_ids) + max(len(self.generated) - 1, 0)
