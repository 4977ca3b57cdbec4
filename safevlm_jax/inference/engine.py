"""Continuous batching: requests come and go in the rows of one decode state (vLLM v1's
engine: a host `Scheduler` beside a device `Runner`, run by one thread).

    engine = Engine.from_checkpoint(ckpt, slots=8).start()
    engine.warm_up()                   # compiles every program the loop can run
    handle = engine.submit(EngineRequest(pixel_values, "What is shown here?", max_tokens=64),
                           on_event=print)
    handle.wait()                      # handle.verdict, handle.text, handle.finish_reason
    engine.shutdown()

`submit` checks a request on the caller's thread (BadRequest with `param` and `code`, naming
the context length when the prompt, the longest hint the policy could insert and max_tokens
do not fit: an accepted request always runs to its end), queues it (QueueFull, EngineClosed)
and returns its `Handle`. The engine's thread runs turns: `Scheduler.schedule()` plans one
(cancellations, a batch of verdicts, one prefill chunk, one decode step), the `Executor` runs
it on the runner, the scheduler turns the outputs into typed events, and each event is
recorded on the request's handle, then given to its `on_event` (on the engine's thread: keep
it short, never block). A request gets one VerdictEvent, TextEvents, then exactly one
DoneEvent; anything that fails for one request (its prompt, its callback, its prefill) ends
that request only, with an error.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
import threading
import time
from typing import Callable

import numpy as np

from safevlm_jax.data.images import ImageConfig
from safevlm_jax.data.tokenizer import max_prompt_chars
from safevlm_jax.inference.constraints import Grammars
from safevlm_jax.inference.detokenize import Detokenizer
from safevlm_jax.inference.errors import CONTEXT_LENGTH, NO_SAFETY, BadRequest, is_int
from safevlm_jax.inference.executor import Executor
from safevlm_jax.inference.requests import (SEEDS, DoneEvent, EngineClosed, EngineEvent, EngineRequest, FinishReason,
                                            Handle, QueueFull, TextEvent, VerdictEvent)
from safevlm_jax.inference.runner import CHUNK_BUCKETS, Runner
from safevlm_jax.inference.scheduler import Scheduler, Seq, Status
from safevlm_jax.inference.stats import EngineStats, snapshot
from safevlm_jax.inference.stops import StopStrings
from safevlm_jax.safety.gate import Gate
from safevlm_jax.safety.verdict import Verdict

__all__ = ["DoneEvent", "Engine", "EngineClosed", "EngineEvent", "EngineRequest", "FinishReason", "Handle",
           "QueueFull", "TextEvent", "VerdictEvent"]
_log = logging.getLogger(__name__)


class Engine:
    """model, tokenizer, images (the checkpoint's image settings), gate (`safety.gate.Gate`);
    slots: rows of the decode state, each of max_length positions (default: the model's; the
    KV cache holds 2 x layers x kv_heads x head_dim values per position and row, f32 on
    CPU); max_queue: most waiting requests; mesh/rules: where the model runs (its parameters
    there already); prefill_chunk: most prompt tokens prefilled per turn while other rows
    decode; prefix_cache_bytes (default: half the KV cache) and verdict_cache_bytes bound
    what is kept of recent prompts and images."""

    def __init__(self, model, tokenizer, images: ImageConfig, gate: Gate, *, slots: int = 8, max_queue: int = 64,
                 max_length: int | None = None, mesh=None, rules: str = "inference", prefill_chunk: int = 64,
                 prefix_cache_bytes: int | None = None, verdict_cache_bytes: int = 64 << 20):
        if slots < 1 or max_queue < 1 or prefill_chunk < 1:
            raise ValueError(f"need slots, max_queue and prefill_chunk >= 1, got {slots}, {max_queue}, "
                             f"{prefill_chunk}")
        self.model, self.tokenizer, self.images, self.gate = model, tokenizer, images, gate
        self.config, self.slots = model.config, slots
        self.max_length = max_length or model.config.text.max_position_embeddings
        self.max_prompt_chars = max_prompt_chars(tokenizer, self.max_length)  # longer: refused untokenized
        self.runner = Runner(model, max_length=self.max_length, eos_id=tokenizer.eos_token_id,
                             pad_id=tokenizer.pad_token_id, mesh=mesh, rules=rules)
        self.runner.reset(slots, self.max_length)
        self.cache_bytes = self.runner.cache_bytes(slots, self.max_length)
        _log.info("engine: %d slots x %d positions, KV cache %.2f GiB", slots, self.max_length,
                  self.cache_bytes / 2**30)
        self._cond, self._tokenize = threading.Condition(), threading.Lock()  # HF tokenizers: one thread at a time
        self.scheduler = Scheduler(rows=slots, max_length=self.max_length, max_queue=max_queue, gate=gate,
                                   eos_id=tokenizer.eos_token_id, detokenizer=lambda: Detokenizer(tokenizer),
                                   row_buckets=self.runner.row_buckets, length_buckets=self.runner.length_buckets,
                                   corners=self.runner.corners_pay, chunk_buckets=CHUNK_BUCKETS,
                                   split_from=self.runner.split_from,
                                   prefill_chunk=prefill_chunk, whole_chunk=self.max_length)
        self.executor = Executor(self.runner, self.scheduler, self._cond, gate, self._tokenize,
                                 prefix_cache_bytes=self.cache_bytes // 2 if prefix_cache_bytes is None
                                 else prefix_cache_bytes, verdict_cache_bytes=verdict_cache_bytes,
                                 image_token_id=model.config.image_token_index)
        self.grammars = Grammars(tokenizer, self.config.text.vocab_size)
        self._handles: dict[int, tuple[Handle, Callable | None]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = self._abort = False
        self._jobs: list[tuple[Callable[[], None], threading.Event]] = []  # run when no row is busy

    @classmethod
    def from_inference(cls, inference, **kw) -> "Engine":
        """The model, tokenizer, image settings, gate and mesh of a `SafeVLMInference`."""
        return cls(inference.model, inference.tokenizer, inference.images, inference.gate, mesh=inference.runner.mesh,
                   rules=inference.runner.rules, **kw)

    @classmethod
    def from_checkpoint(cls, directory: str, *, template=None, hints=None, policy=None, mesh=None,
                        rules: str = "inference", **kw) -> "Engine":
        """A checkpoint's engine (its template unless given; parameters restored into `mesh`)."""
        from safevlm_jax.inference.pipeline import SafeVLMInference

        extra = {k: v for k, v in (("hints", hints), ("policy", policy)) if v is not None}
        return cls.from_inference(SafeVLMInference.from_checkpoint(directory, template=template, mesh=mesh,
                                                                   rules=rules, **extra), **kw)

    # The caller's side ------------------------------------------------------------------
    def start(self) -> "Engine":
        """Starts the loop thread (once)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="safevlm-engine", daemon=True)
                self._thread.start()
        return self

    def submit(self, request: EngineRequest, on_event: Callable[[EngineEvent], None] | None = None) -> Handle:
        """Checks and queues a request; its events go to `on_event` on the engine's thread."""
        return self.submit_choices(request, 1, None if on_event is None else lambda i, event: on_event(event))[0]

    def submit_choices(self, request: EngineRequest, n: int,
                       on_event: Callable[[int, EngineEvent], None] | None = None) -> list[Handle]:
        """`n` answers to one request (OpenAI's `n`), choice i with seed `request.seed + i`:
        one verdict (their image is encoded once) and one prefill (the later choices copy the
        first's prefix from the prefix cache, then each samples its own first token); events
        go to `on_event(i, event)`."""
        if not is_int(n) or not 1 <= n <= self.scheduler.max_queue:
            raise BadRequest(f"n must be an integer in [1, {self.scheduler.max_queue}] (the queue), got {n!r}", "n")
        request.check(self.config.text.vocab_size)
        if request.safety and not self.model.has_safety:
            raise BadRequest("this checkpoint has no safety modules; send the request with safety off", "safety",
                             NO_SAFETY)
        chars = sum(len(t.value) for t in request.conversation.turns) + len(request.conversation.system or "")
        if chars > self.max_prompt_chars:
            raise BadRequest(f"prompt of {chars} characters exceeds the context length {self.max_length}: that many "
                             f"tokens spell at most {self.max_prompt_chars} characters", "prompt", CONTEXT_LENGTH)
        pixels = None if request.pixel_values is None else self._pixels(request.pixel_values)
        with self._tokenize:
            try:
                longest = self.gate.max_prompt_len(request.conversation, request.prompt_format,
                                                   safety=request.safety, image=pixels is not None)
            except ValueError as e:  # the template cannot hold this conversation
                raise BadRequest(str(e), "prompt") from None
        if longest + request.max_tokens > self.max_length:
            raise BadRequest(f"prompt of up to {longest} tokens (with the longest safety hint it could get) + "
                             f"max_tokens={request.max_tokens} exceeds the context length {self.max_length}",
                             "max_tokens", CONTEXT_LENGTH)
        image = None if pixels is None else hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest()
        request = dataclasses.replace(request, pixel_values=pixels)
        grammar = None if request.json_schema is None else self.grammars.compile(request.json_schema)
        choices = [dataclasses.replace(request, seed=(request.seed + i - SEEDS[0]) % 2**64 + SEEDS[0])
                   for i in range(n)]
        seqs, handles = [], []
        with self._cond:
            for i, choice in enumerate(choices):
                handle = Handle(next(self._ids), choice, self._wake)
                seqs.append(Seq(handle.id, choice, image, Detokenizer(self.tokenizer), time.monotonic(),
                                stops=StopStrings(choice.stop) if choice.stop else None,
                                grammar=None if grammar is None else self.grammars.matcher(grammar),
                                leader=seqs[0] if seqs else None, shared=n > 1))
                handles.append(handle)
            self.scheduler.add(*seqs)
            for i, handle in enumerate(handles):
                self._handles[handle.id] = (handle, None if on_event is None else functools.partial(on_event, i))
            self._cond.notify()
        return handles

    def moderate(self, pixel_values: np.ndarray) -> list[Verdict]:
        """Verdicts of images [B, S, S, 3] from the safety head alone (CLIP + head, no LLM
        layer; the program of a request's verdict, so the two agree)."""
        if not self.model.has_safety:
            raise BadRequest("this checkpoint has no safety modules, so it has no verdict", None, NO_SAFETY)
        if not len(pixel_values):
            return []
        pixels = np.stack([self._pixels(p) for p in pixel_values])
        _, level, kind = self.runner.encode(pixels, [self.gate.query_id] * len(pixels), True)
        return self.gate.verdicts(level, kind)

    def warm_up(self, timeout: float | None = None) -> None:
        """Compiles every program the loop can run (at its next turn with no busy row) and
        waits for it; starts the loop if need be."""
        done = threading.Event()
        with self._cond:
            self._jobs.append((self.executor.compile_all, done))
            self._cond.notify()
        self.start()
        if not done.wait(timeout):
            raise TimeoutError(f"the engine's programs were not compiled within {timeout} s")

    def stats(self) -> EngineStats:
        with self._cond:
            s = self.scheduler
            return snapshot(s.counters, queue_depth=len(s.queue),
                            waiting_verdict=sum(q.status is Status.WAITING for q in s.queue), active_slots=len(s.busy),
                            slots=self.slots, max_length=self.max_length, cache_bytes=self.cache_bytes,
                            prefix_cache_bytes=self.executor.prefixes.nbytes,
                            running=self._thread is not None and self._thread.is_alive(), accepting=s.accepting)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops accepting; with `drain` finishes every accepted request (for at most
        `timeout` seconds), then cancels what is left; joins the loop thread."""
        with self._cond:
            self.scheduler.accepting, self._stopping = False, True
            self._abort = self._abort or not drain
            self._cond.notify()
        self.start()  # requests queued before start() still get their "done"
        self._thread.join(timeout if drain else None)
        if self._thread.is_alive():
            with self._cond:
                self._abort = True
                self._cond.notify()
            self._thread.join()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _pixels(self, pixels) -> np.ndarray:
        size = self.config.vision.image_size
        pixels = np.asarray(pixels, np.float32)
        if pixels.shape != (size, size, 3) or not np.all(np.isfinite(pixels)):
            raise BadRequest(f"pixel_values must be a finite float array [{size}, {size}, 3] (preprocessed), "
                             f"got shape {pixels.shape}", "pixel_values")
        return pixels

    # The loop (engine thread) -----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job, out = None, []
            with self._cond:
                while not (self.scheduler.in_flight() or self._stopping or self._jobs):
                    self._cond.wait()
                for seq in self.scheduler.in_flight():
                    seq.cancelled = seq.cancelled or self._abort or self._handles[seq.id][0].cancelled
                if self._jobs and not self.scheduler.busy:
                    job = self._jobs.pop(0)
                elif self._stopping and not self.scheduler.in_flight():
                    for _, done in self._jobs:  # asked while stopping: nothing is left to serve
                        done.set()
                    return
                plan, out = self.scheduler.schedule()
            self._deliver(out)
            if job is not None:
                self._run_job(*job)
                continue
            try:
                out = self.executor.run(plan)
            except Exception as e:  # a bug outside the guarded programs: fail what is in flight
                _log.exception("engine turn failed")
                with self._cond:
                    out = [x for s in self.scheduler.in_flight()
                           for x in self.scheduler.finish(s, FinishReason.ERROR, f"{type(e).__name__}: {e}")]
            self._deliver(out)

    def _deliver(self, out: list[tuple[Seq, EngineEvent]]) -> None:
        """Each event to its handle, then to its callback; a callback that raises ends its
        request with an error (its "done" is the last event it gets)."""
        for seq, event in out:
            handle, on_event = self._handles.get(seq.id, (None, None))
            if handle is None or handle.done_event is not None:
                continue
            handle.record(event)
            try:
                if on_event is not None:
                    on_event(event)
            except Exception as e:
                _log.exception("on_event of request %d raised", seq.id)
                if not isinstance(event, DoneEvent):
                    with self._cond:
                        failed = self.scheduler.finish(seq, FinishReason.ERROR,
                                                       f"on_event raised {type(e).__name__}: {e}")
                    self._deliver(failed)
            if isinstance(event, DoneEvent):
                self.executor.drop(seq)
                with self._cond:
                    self._handles.pop(seq.id, None)
                handle._finished()

    def _run_job(self, job: Callable[[], None], done: threading.Event) -> None:
        try:
            job()
        except Exception:  # the programs compile again when requests need them
            _log.exception("engine job failed")
        done.set()
