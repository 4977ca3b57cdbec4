"""The engine's host bookkeeping (vLLM v1's scheduler): a queue, admission through the safety
gate, a row of the decode state per request, stop conditions, cancellation, typed events and
counters. No device, no JAX: the engine runs the device programs a `Plan` asks for and hands
their outputs back.

    plan = scheduler.schedule()              # release, verdicts, one prefill chunk, decode
    out = scheduler.verdicts_done(plan.verdict, verdicts, features)      # admission
    out += scheduler.prefilled(seq, upto, token)                          # token: the last chunk's
    out += scheduler.started(seq)                        # or: its first token comes from a decode step
    out += scheduler.stepped(tokens, done, logprobs)                      # a decode step's rows
    for seq, event in out: ...                                            # to the request's caller

A request: WAITING (in the queue) -> its verdict (batched with others; none without an image
or with safety off) -> the gate admits it (prompt ids, the hint inserted) or blocks it (the
policy's refusal, never a row) -> READY -> PREFILL (it holds the lowest free row; its prompt
goes in chunks, one per turn, `prefill_chunk` tokens while other rows decode and whole when
none does, so decoding rows are never stalled by a whole prompt) -> DECODE (one token per
step) -> DONE (EOS or max_tokens as the device reports them, a stop string, cancelled, or
failed). Each request gets exactly one VerdictEvent first and exactly one DoneEvent last.

A request with a grammar or asking for logprobs is `deferred`: its prompt but the last token is
prefilled, and the first decode step reads that token and samples the first answer token under
the grammar's mask, with its log-probabilities. While a constrained row decodes, the step runs
over the whole state with the mask (one program variant: `masked_shape`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Any, Callable

from safevlm_jax.inference.buckets import bucket
from safevlm_jax.inference.requests import (DoneEvent, EngineClosed, EngineEvent, FinishReason, QueueFull, TextEvent,
                                            VerdictEvent)
from safevlm_jax.inference.seqs import Seq, Status
from safevlm_jax.inference.stats import Counters
from safevlm_jax.safety.gate import Gate, Refusal
from safevlm_jax.safety.verdict import Verdict

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Plan:
    """What one turn runs, in this order. release: rows to stop decoding; save: finished
    rows to keep as prefixes, (row, ids it holds, its request); verdict: requests whose images
    to encode; begin: requests that took a row and start their prefill; prefill: the request
    whose next chunk (`Scheduler.chunk`, at most `budget` tokens) runs; decode: (rows,
    length) of the decode step, or None (`masked_shape` when a decoding row has a grammar)."""

    release: list[int]
    save: list[tuple[int, list[int], Seq]]
    verdict: list[Seq]
    begin: list[Seq]
    prefill: Seq | None
    budget: int
    decode: tuple[int, int] | None


Output = list[tuple[Seq, EngineEvent]]


class Scheduler:
    """rows x max_length: the decode state; max_queue: most waiting requests; gate: the
    safety gate; eos_id: the EOS token; detokenizer(): a fresh Detokenizer; row_buckets /
    length_buckets: the decode step's shapes; corners: step over the corner of rows and slots
    that holds every decoding row (else always the whole state); prefill_chunk: most prompt
    tokens per turn while rows decode (whole_chunk when none do); chunk_buckets: the widths a
    prefill chunk is padded to (at most its prefix's slots, a length bucket), used to keep a
    chunk at least half real tokens, split_from: the narrowest chunk worth a call of its own;
    save_prefixes: keep finished rows as prefixes."""

    def __init__(self, *, rows: int, max_length: int, max_queue: int, gate: Gate, eos_id: int,
                 detokenizer: Callable[[], Any],
                 row_buckets: tuple[int, ...], length_buckets: tuple[int, ...], prefill_chunk: int,
                 whole_chunk: int, chunk_buckets: tuple[int, ...] = (), split_from: int = 256,
                 save_prefixes: bool = True, corners: bool = True):
        self.rows, self.max_length, self.max_queue, self.gate, self.eos_id = rows, max_length, max_queue, gate, eos_id
        self.detokenizer, self.row_buckets, self.length_buckets = detokenizer, row_buckets, length_buckets
        self.prefill_chunk, self.whole_chunk, self.save_prefixes = prefill_chunk, whole_chunk, save_prefixes
        self.corners, self.chunk_buckets, self.split_from = corners, chunk_buckets, split_from
        self.queue: collections.deque[Seq] = collections.deque()  # WAITING and READY, in order
        self.slots: list[Seq | None] = [None] * rows
        self.accepting = True
        self.counters = Counters()
        self._release: list[int] = []
        self._save: list[tuple[int, list[int], Seq]] = []

    # The caller's side ------------------------------------------------------------------
    def add(self, *seqs: Seq) -> None:
        """Queues an accepted request, or all the choices of one (QueueFull, EngineClosed)."""
        if not self.accepting:
            raise EngineClosed("the engine is shutting down and accepts no new request")
        if len(self.queue) + len(seqs) > self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting; try again later")
        self.queue.extend(seqs)
        self.counters.accepted += len(seqs)

    @property
    def busy(self) -> list[Seq]:
        return [s for s in self.slots if s is not None]

    def in_flight(self) -> list[Seq]:
        return [*self.queue, *self.busy]

    # Planning ---------------------------------------------------------------------------
    def schedule(self) -> tuple[Plan, Output]:
        """This turn's plan, and the events of requests cancelled since the last one."""
        out: Output = []
        for seq in self.in_flight():
            if seq.cancelled:
                out += self.finish(seq, FinishReason.CANCELLED)
        free = self.rows - len(self.busy)
        ready = sum(s.status is Status.READY for s in self.queue)
        verdict = [s for s in self.queue if s.status is Status.WAITING][:max(free - ready, 0)]
        begin = []
        # a later choice begins once the first's prompt is prefilled: it copies that prefix
        may_begin = lambda s: s.leader is None or s.leader.status in (Status.DECODE, Status.DONE)
        for seq in [s for s in self.queue if s.status is Status.READY and may_begin(s)][:free]:
            self.queue.remove(seq)
            seq.row, seq.status, seq.admitted = self.slots.index(None), Status.PREFILL, time.monotonic()
            self.slots[seq.row] = seq
            begin.append(seq)
        prefilling = [s for s in self.busy if s.status is Status.PREFILL]
        decoding = [s for s in self.busy if s.status is Status.DECODE]
        prefill = min(prefilling, key=lambda s: s.admitted) if prefilling else None
        plan = Plan(self._release, self._save, verdict, begin, prefill,
                    self.prefill_chunk if decoding else self.whole_chunk, self._decode_shape(decoding))
        self._release, self._save = [], []
        return plan, out

    def chunk(self, seq: Seq, budget: int) -> int:
        """Tokens of `seq`'s next prefill chunk (budget: its plan's): all it has left up to
        `budget`, unless they would fill less than half the chunk's padded width; then the
        largest chunk bucket below them of at least `split_from` (the rest follows in later
        turns: two calls cost less than one mostly padding)."""
        left = min(budget, len(seq.prompt_ids) - seq.deferred - seq.computed)
        if not self.chunk_buckets:
            return left
        slots = bucket(len(seq.prompt_ids), self.length_buckets, "prompt length")
        width = min(next((b for b in self.chunk_buckets if b >= left), slots), slots)
        below = [b for b in self.chunk_buckets if self.split_from <= b < left]
        return below[-1] if width > 2 * left and below else left

    def _decode_shape(self, decoding: list[Seq]) -> tuple[int, int] | None:
        """(rows, length) buckets holding every decoding row and its next slot."""
        if not decoding:
            return None
        if any(s.grammar is not None for s in decoding):
            return self.masked_shape()
        return self._shape(bucket(max(s.row for s in decoding) + 1, self.row_buckets, "row"),
                           bucket(max(s.cached for s in decoding) + 1, self.length_buckets, "position"))

    def _shape(self, rows: int, length: int) -> tuple[int, int]:
        """A step over fewer rows or slots than the whole state reads them through a copy
        (XLA's dot takes no strided operand), which only a corner much smaller than the state
        pays for; without `corners` every step runs over the whole state."""
        if not self.corners or (rows == self.rows and 4 * length > self.max_length):
            return self.rows, self.length_buckets[-1]
        return rows, length

    def masked_shape(self) -> tuple[int, int]:
        """The one (rows, length) of a step with grammar masks: the whole state."""
        return self._shape(self.rows, self.length_buckets[-1])

    def step_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, length) a decode step can have."""
        return sorted({self._shape(r, n) for r in self.row_buckets for n in self.length_buckets})

    # Outputs ----------------------------------------------------------------------------
    def verdicts_done(self, seqs: list[Seq], verdicts: list[Verdict | None], features: list[Any]) -> Output:
        """Each request's verdict (None without one) and its image's features: admission."""
        out: Output = []
        for seq, verdict, feats in zip(seqs, verdicts, features):
            if seq.status is not Status.WAITING:  # cancelled meanwhile
                continue
            seq.verdict, seq.features = (verdict if seq.request.safety else None), feats
            out += self.admit(seq)
        return out

    def admit(self, seq: Seq) -> Output:
        """The gate's decision for a request whose verdict is known (or needs none)."""
        r, v = seq.request, seq.verdict
        if v is not None:
            self.counters.verdict(v)
        try:
            admitted = self.gate.admit(v, r.conversation, r.prompt_format, safety=r.safety,
                                       image=seq.image is not None)
        except Exception as e:  # this request's prompt only
            return self._said(seq) + self.finish(seq, FinishReason.ERROR, _error(e))
        if isinstance(admitted, Refusal):
            return self._said(seq) + [(seq, TextEvent(admitted.text))] + self.finish(seq, FinishReason.BLOCKED)
        if len(admitted) + r.max_tokens > self.max_length:  # cannot happen: submit checks the longest hint
            return self._said(seq) + self.finish(
                seq, FinishReason.ERROR, f"prompt of {len(admitted)} tokens + max_tokens={r.max_tokens} exceeds "
                                         f"the context length {self.max_length}")
        seq.prompt_ids, seq.status = admitted, Status.READY
        return self._said(seq)

    def _said(self, seq: Seq) -> Output:
        """Its VerdictEvent (its verdict, the policy's action, its prompt ids so far)."""
        seq.said_verdict = True
        v = seq.verdict if seq.request.safety else None
        return [(seq, VerdictEvent(v, v and v.action, tuple(seq.prompt_ids)))]

    def prefilled(self, seq: Seq, upto: int, token: int | None) -> Output:
        """Its prompt is prefilled up to `upto`; `token`: the first answer token, sampled
        after the whole prompt (it is then in its row of the decode state)."""
        self.counters.prefill_tokens += upto - seq.computed
        seq.computed = upto
        if token is None or seq.status is not Status.PREFILL:
            return []
        seq.status = Status.DECODE
        self.counters.prompt_tokens += len(seq.prompt_ids)
        return self._take(seq, token, done=seq.request.max_tokens <= 1 or token == self.eos_id)

    def started(self, seq: Seq) -> Output:
        """A deferred request's prompt is in its row: the next decode step samples its first token."""
        if seq.status is Status.PREFILL:
            seq.status = Status.DECODE
            self.counters.prompt_tokens += len(seq.prompt_ids)
        return []

    def stepped(self, tokens, done, logprobs=None) -> Output:
        """A decode step's tokens [rows], done flags [rows] (EOS or max_tokens reached) and,
        when a row asked, (logprob [rows], top ids [rows, k], top logprobs [rows, k]) as numpy."""
        out: Output = []
        for seq in [s for s in self.busy if s.status is Status.DECODE and s.row < len(tokens)]:
            r = seq.row
            try:
                entry = None if logprobs is None or not seq.request.logprobs else \
                    (int(tokens[r]), float(logprobs[0][r]), tuple(logprobs[1][r].tolist()),
                     tuple(logprobs[2][r].tolist()))
                out += self._take(seq, int(tokens[r]), bool(done[r]), entry)
            except Exception as e:  # e.g. its detokenizer: that request alone ends
                _log.exception("request %d's token failed", seq.id)
                out += self.finish(seq, FinishReason.ERROR, _error(e), released=bool(done[r]))
        return out

    def _take(self, seq: Seq, token: int, done: bool, logprob: tuple | None = None) -> Output:
        seq.generated.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        seq.first_token = seq.first_token or time.monotonic()
        eos = token == self.eos_id
        if seq.grammar is not None and not eos:
            seq.grammar.consume(token)
        text = "" if eos else seq.detok.push(token)
        if text and seq.stops is not None:
            text, seq.stopped = seq.stops.push(text)
        out: Output = self._text(seq, text)
        if seq.stopped:
            out += self.finish(seq, FinishReason.STOP, released=done)
        elif done:
            out += self.finish(seq, FinishReason.STOP if eos else FinishReason.LENGTH, released=True)
        return out

    def _text(self, seq: Seq, text: str) -> Output:
        """A TextEvent of `text` with the tokens (and logprobs) not yet carried, if any text."""
        if not text:
            return []
        event = TextEvent(text, tuple(seq.generated[seq.reported:]), tuple(seq.logprobs[seq.reported:]))
        seq.reported = len(seq.generated)
        return [(seq, event)]

    def finish(self, seq: Seq, reason: FinishReason, error: str | None = None, released: bool = False) -> Output:
        """The request's last events (once): the text still held back, then done; its row is
        freed (and stopped on the device unless `released`: the device stopped it)."""
        if seq.status is Status.DONE:
            return []
        out = [] if seq.said_verdict else self._said(seq)  # never got its verdict
        if seq in self.queue:
            self.queue.remove(seq)
        if seq.row is not None:
            self.slots[seq.row] = None
            if not released:
                self._release.append(seq.row)
            elif reason in (FinishReason.STOP, FinishReason.LENGTH) and self.save_prefixes:
                self._save.append((seq.row, seq.prompt_ids + seq.generated[:-1], seq))
        if reason in (FinishReason.STOP, FinishReason.LENGTH) and not seq.stopped:
            tail = seq.detok.flush()
            if seq.stops is not None:
                tail, seq.stopped = seq.stops.push(tail)
                tail += "" if seq.stopped else seq.stops.flush()
            out += self._text(seq, tail)
        seq.status = Status.DONE
        self.counters.finished[reason.value] += 1
        since = lambda t: None if t is None else t - seq.submitted
        out.append((seq, DoneEvent(reason, len(seq.prompt_ids), len(seq.generated), error,
                                   {"queue_s": since(seq.admitted), "ttft_s": since(seq.first_token),
                                    "total_s": time.monotonic() - seq.submitted},
                                   tuple(seq.generated[seq.reported:]))))
        return out


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
