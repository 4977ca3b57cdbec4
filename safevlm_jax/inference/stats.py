"""The engine's counters (kept by the scheduler on the engine's thread) and the snapshot
`Engine.stats()` returns (`EngineStats`, what /health and /metrics show)."""

from __future__ import annotations

import collections
import dataclasses
import time

from safevlm_jax.inference.requests import FinishReason
from safevlm_jax.safety.verdict import Verdict

RECENT_S = 10.0  # the window of the rates


@dataclasses.dataclass
class Counters:
    """Totals since the start; `recent`: (time, tokens out, seconds of a decode step or 0)
    over the last RECENT_S seconds."""

    accepted: int = 0
    finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    tokens: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    reused_tokens: int = 0
    prefix_hits: int = 0
    verdict_hits: int = 0
    programs: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    busy_s: float = 0.0
    by_level: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    by_type: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    recent: collections.deque = dataclasses.field(default_factory=collections.deque)
    started: float = dataclasses.field(default_factory=time.monotonic)

    def verdict(self, v: Verdict) -> None:
        self.by_level[v.risk_level] += 1
        self.by_type[v.risk_type_name] += 1

    def program(self, name: str, seconds: float, tokens: int = 0) -> None:
        """A device program ran (`name`: verdict, prefill, decode, ...); `tokens` came out of it."""
        self.programs[name] += 1
        self.busy_s += seconds
        self.tokens += tokens
        if tokens or name == "decode":
            self.recent.append((time.monotonic(), tokens, seconds if name == "decode" else 0.0))


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """queue_depth: requests waiting (for a verdict or a row); waiting_verdict; active_slots:
    rows in use; slots, max_length, cache_bytes (the decode state's KV cache); accepted;
    finished {reason: n}; tokens_generated; prompt_tokens (admitted prompts), prefill_tokens
    (of them computed), reused_tokens (taken from cached prefixes), prefix_hits,
    verdict_cache_hits, prefix_cache_bytes; decode_steps, prefill_chunks, verdict_batches;
    tokens_per_s and decode_step_s (the mean step), both over the last RECENT_S seconds (so
    compiles and idle time age out); busy_s (time in device programs); verdicts_by_level,
    verdicts_by_type; running, accepting, uptime_s."""

    queue_depth: int
    waiting_verdict: int
    active_slots: int
    slots: int
    max_length: int
    cache_bytes: int
    accepted: int
    finished: dict
    tokens_generated: int
    prompt_tokens: int
    prefill_tokens: int
    reused_tokens: int
    prefix_hits: int
    verdict_cache_hits: int
    prefix_cache_bytes: int
    decode_steps: int
    prefill_chunks: int
    verdict_batches: int
    tokens_per_s: float
    decode_step_s: float
    busy_s: float
    verdicts_by_level: dict
    verdicts_by_type: dict
    running: bool
    accepting: bool
    uptime_s: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def snapshot(c: Counters, **state) -> EngineStats:
    """EngineStats from the counters and the engine's state now (queue_depth, waiting_verdict,
    active_slots, slots, max_length, cache_bytes, prefix_cache_bytes, running, accepting)."""
    now = time.monotonic()
    while c.recent and c.recent[0][0] < now - RECENT_S:
        c.recent.popleft()
    span = min(RECENT_S, now - c.started)
    steps = [s for _, _, s in c.recent if s]
    return EngineStats(**state, accepted=c.accepted, finished={r.value: c.finished[r.value] for r in FinishReason},
                       tokens_generated=c.tokens, prompt_tokens=c.prompt_tokens, prefill_tokens=c.prefill_tokens,
                       reused_tokens=c.reused_tokens, prefix_hits=c.prefix_hits, verdict_cache_hits=c.verdict_hits,
                       decode_steps=c.programs["decode"], prefill_chunks=c.programs["prefill"],
                       verdict_batches=c.programs["verdict"],
                       tokens_per_s=sum(n for _, n, _ in c.recent) / span if span > 0 else 0.0,
                       decode_step_s=sum(steps) / len(steps) if steps else 0.0, busy_s=c.busy_s,
                       verdicts_by_level=dict(c.by_level), verdicts_by_type=dict(c.by_type), uptime_s=now - c.started)
