"""Continuous batching: requests come and go in the rows ("slots") of one KV cache.

    engine = Engine(SafeVLMInference.from_checkpoint(ckpt), slots=8)
    engine.start()
    handle = engine.submit(EngineRequest(pixel_values, "What is shown here?", max_tokens=64),
                           on_event=print)
    handle.wait()                      # handle.verdict, handle.text, handle.finish_reason
    engine.shutdown()

Contract with the HTTP server, as agreed, and what was added to it (marked +):
- `Engine(inference, slots=8, max_queue=64, max_length=None)`; `start()`;
  `shutdown(drain=True)`: stops accepting, finishes (or with drain=False cancels) every
  accepted request, joins the thread (+ `timeout`).
- `submit(EngineRequest, on_event=None) -> Handle` raises `QueueFull` when `max_queue`
  requests wait; `BadRequest` (`inference.errors`, a ValueError) for bad input, naming the
  field, or the context length for prompt + max_tokens (+ the room kept for a safety hint);
  + `EngineClosed` (a RuntimeError) once shutdown began.
- `on_event(EngineEvent)` runs on the engine thread (keep it short, never block), in order:
  one "verdict", zero or more "text" deltas, exactly one "done" (+ with `timings`).
- `Handle.cancel()`: the request leaves its slot (or the queue) at the next turn, "done" says
  "cancelled". + The handle records what arrived (`verdict`, `action`, `text`, `token_ids`,
  `prompt_ids`, `finish_reason`, `done_event`) and has `wait(timeout)`.
- `moderate(pixel_values [B, S, S, 3], safety_texts=None) -> list[Verdict]`: the verdict
  alone (CLIP + safety head, no LLM layer); `Verdict.action` is the policy's action.
- `stats() -> dict` (see `Engine.stats`).
- + `compile_decode_steps(timeout=None)`: the loop compiles its decode step at every (rows,
  length) bucket, at its next turn with no busy slot (requests wait meanwhile); blocks until done.
- A verdict needs an image: text-only requests, and requests with safety off, get
  verdict=None and action=None.

The loop (one background thread), the JetStream/vLLM way:
  1. cancelled requests leave the queue or their slot;
  2. up to as many waiting requests as there are free slots get their verdict in one batched
     encode call (`Decoder.encode`: CLIP + safety head); the risk policy chooses the hint, or
     blocks: a blocked request is answered with the policy's refusal and never takes a slot;
  3. each free slot takes the oldest request with a verdict: its prompt (hint inserted) is
     prefilled into the slot's row (`slots.prefill`), which samples its first token;
  4. one jitted decode step advances every busy slot by one token (`slots.decode_step`), each
     at its own position with its own temperature, top-k, top-p and seed; a request that
     stops (EOS or max_tokens) frees its slot for step 3 of the next turn while the others
     keep decoding. The step reads only the rows below the highest busy slot and the cache
     slots below the furthest busy position, each rounded up to a bucket (a free slot is the
     lowest one, so few requests sit in few rows).
Programs compile per encode batch bucket, per (prompt length bucket, safety on/off, image or
not) for prefill, and per (rows, length) bucket for the decode step: nothing recompiles after
warm-up (`compile_decode_steps` and one request of each kind). A request is
accepted only if its prompt, the longest hint it could get and max_tokens fit the context, so
an accepted request always runs to its end. An exception inside the loop fails the requests it
touched ("done" with "error"); the loop keeps serving.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable

import numpy as np

from safevlm_jax.data.records import HUMAN, Turn
from safevlm_jax.data.template import PROMPT_FORMATS
from safevlm_jax.data.tokenizer import max_prompt_chars
from safevlm_jax.inference import slots as programs
from safevlm_jax.inference.buckets import BATCH_BUCKETS, DECODE_LENGTH_BUCKETS, PROMPT_BUCKETS, bucket, capped
from safevlm_jax.inference.decode import new_cache
from safevlm_jax.inference.detokenize import Detokenizer
from safevlm_jax.inference.errors import BadRequest
from safevlm_jax.inference.requests import (FINISH_REASONS, EngineClosed, EngineEvent, EngineRequest, Handle,
                                            QueueFull)
from safevlm_jax.inference.sampling import PerRow
from safevlm_jax.safety.prompt import PromptBuilder
from safevlm_jax.safety.verdict import Verdict

__all__ = ["Engine", "EngineClosed", "EngineEvent", "EngineRequest", "Handle", "QueueFull"]
_log = logging.getLogger(__name__)
RECENT_S = 10.0  # the window of stats()'s rates


@dataclasses.dataclass(eq=False)
class _Row:
    """The engine's state of one request."""

    handle: Handle
    on_event: Callable[[EngineEvent], None] | None
    ids: list[int]  # the prompt's ids: without a hint until the verdict, then with it
    detok: Detokenizer
    submitted: float
    pixels: np.ndarray | None  # [S, S, 3] f32, checked
    features: np.ndarray | None = None  # [N, C] once encoded
    slot: int | None = None
    generated: list[int] = dataclasses.field(default_factory=list)
    admitted: float | None = None
    first_token: float | None = None
    said_verdict: bool = False
    finished: bool = False

    @property
    def request(self) -> EngineRequest:
        return self.handle.request


class Engine:
    """Continuous batching over `slots` rows of one KV cache of `max_length` positions
    (default: the decoder's context length); at most `max_queue` requests wait. The cache
    holds 2 x layers x kv_heads x head_dim values per position and slot (f32 on CPU: for
    LLaVA-1.5-7B, 8 slots x 4096 positions are 32 GiB; choose max_length to fit)."""

    def __init__(self, inference, slots: int = 8, max_queue: int = 64, max_length: int | None = None):
        if slots < 1 or max_queue < 1:
            raise ValueError(f"need slots >= 1 and max_queue >= 1, got {slots}, {max_queue}")
        self.inference, self.slots, self.max_queue = inference, slots, max_queue
        self.decoder, self.tokenizer = inference.decoder, inference.tokenizer
        self.config = inference.model.config
        self.max_length = max_length or self.decoder.max_length
        self.max_prompt_chars = max_prompt_chars(self.tokenizer, self.max_length)  # longer: refused untokenized
        self.prompt_buckets = capped(PROMPT_BUCKETS, self.max_length)
        # a decode step reads the rows and slots that busy requests reach (programs.decode_step)
        self.row_buckets = capped(BATCH_BUCKETS, slots)
        self.length_buckets = capped(DECODE_LENGTH_BUCKETS, self.max_length)
        model, template = inference.model, inference.builders[True].template
        self.builders = {(safety, f): PromptBuilder(self.tokenizer, model.num_image_tokens(safety), template,
                                                    inference.hints, f)
                         for safety in (True, False) for f in PROMPT_FORMATS}
        self._tokenize_lock = threading.Lock()  # HF tokenizers are not safe across threads
        self._hint_room = self._longest_hint()
        self._cond = threading.Condition()
        self._incoming: collections.deque[_Row] = collections.deque()  # waiting for a verdict
        self._ready: collections.deque[_Row] = collections.deque()  # waiting for a slot
        self._rows: list[_Row | None] = [None] * slots
        self._verdicting: list[_Row] = []  # taken from the queue, getting their verdict
        self._cache = new_cache(self.config, slots, self.max_length, per_row=True, like=self.decoder.state)
        self.cache_bytes = sum(b.nbytes for b in (*self._cache.k, *self._cache.v))
        _log.info("engine: %d slots x %d positions, KV cache %.2f GiB", slots, self.max_length,
                  self.cache_bytes / 2**30)
        self._last = np.zeros(slots, np.int32)  # each slot's last token
        self._rule = {"temperature": np.zeros(slots, np.float32), "top_k": np.zeros(slots, np.int32),
                      "top_p": np.ones(slots, np.float32)}
        self._seeds = np.zeros(slots, np.uint32)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._accepting, self._stopping, self._abort = True, False, False
        self._compile_asked: threading.Event | None = None  # set by compile_decode_steps
        self._counts = collections.Counter()
        # (time, tokens out, seconds of a decode step or 0) over the last RECENT_S seconds
        self._recent: collections.deque[tuple[float, int, float]] = collections.deque()
        self._started = time.monotonic()

    # The caller's side ---------------------------------------------------------------------
    def start(self) -> "Engine":
        """Starts the loop thread (once)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="safevlm-engine", daemon=True)
                self._thread.start()
        return self

    def submit(self, request: EngineRequest, on_event: Callable[[EngineEvent], None] | None = None) -> Handle:
        """Queues a request; its events go to `on_event` on the engine thread."""
        ids, pixels = self._check(request)
        with self._cond:
            if not self._accepting:
                raise EngineClosed("the engine is shutting down and accepts no new request")
            if len(self._incoming) + len(self._ready) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting; try again later")
            handle = Handle(next(self._ids), request, self._wake)
            row = _Row(handle, on_event, ids, Detokenizer(self.tokenizer), time.monotonic(), pixels)
            handle.token_ids, handle.prompt_ids = row.generated, ids
            self._incoming.append(row)
            self._counts["accepted"] += 1  # the lock is held
            self._cond.notify()
        return handle

    def moderate(self, pixel_values_batch: np.ndarray, safety_texts: list[str] | None = None) -> list[Verdict]:
        """Verdicts of images [B, S, S, 3] from the safety head alone (CLIP + head, no LLM
        layer; the same program as a request's verdict, so the two agree). The head's query
        is the first token of the prompt built for `safety_texts[i]` (default ""): BOS."""
        if not self.inference.model.has_safety:
            raise BadRequest("this checkpoint has no safety modules, so it has no verdict")
        if not len(pixel_values_batch):
            return []
        pixels = np.stack([self._pixels(p) for p in pixel_values_batch])
        texts = safety_texts if safety_texts is not None else [""] * len(pixels)
        if len(texts) != len(pixels):
            raise BadRequest(f"{len(texts)} safety_texts for {len(pixels)} images")
        with self._tokenize_lock:
            first = [self.builders[(True, "llava")].build(t)[0] for t in texts]
        verdicts = []
        for start in range(0, len(pixels), BATCH_BUCKETS[-1]):
            chunk = slice(start, start + BATCH_BUCKETS[-1])
            _, level, kind = self.decoder.encode(pixels[chunk], first[chunk], True)
            verdicts += self.inference.policy.verdicts(level, kind, self.inference.hints)
        return verdicts

    def stats(self) -> dict:
        """queue_depth (waiting requests), waiting_verdict, active_slots, slots, max_length,
        cache_bytes (the KV cache), accepted, finished {reason: n}, tokens_generated,
        prompt_tokens, decode_steps, prefills, verdict_batches, tokens_per_s and decode_step_s
        (the mean step; both over the last RECENT_S seconds, so compiles and idle time age
        out), busy_s (time in device programs), verdicts_by_level, verdicts_by_type, running,
        accepting, uptime_s."""
        now = time.monotonic()
        with self._cond:
            while self._recent and self._recent[0][0] < now - RECENT_S:
                self._recent.popleft()
            recent = sum(n for _, n, _ in self._recent)
            step_times = [s for _, _, s in self._recent if s]
            span = min(RECENT_S, now - self._started)
            c = dict(self._counts)
        steps = c.get("decodes", 0)
        return {"queue_depth": len(self._incoming) + len(self._ready), "waiting_verdict": len(self._incoming),
                "active_slots": sum(r is not None for r in self._rows), "slots": self.slots,
                "max_length": self.max_length, "cache_bytes": self.cache_bytes,
                "accepted": c.get("accepted", 0),
                "finished": {r: c.get(f"finished_{r}", 0) for r in FINISH_REASONS},
                "tokens_generated": c.get("tokens", 0), "prompt_tokens": c.get("prompt_tokens", 0),
                "decode_steps": steps, "prefills": c.get("prefills", 0),
                "verdict_batches": c.get("verdicts", 0),
                "tokens_per_s": recent / span if span > 0 else 0.0,
                "decode_step_s": sum(step_times) / len(step_times) if step_times else 0.0,
                "busy_s": c.get("busy_us", 0) / 1e6,
                "verdicts_by_level": {k[6:]: n for k, n in c.items() if k.startswith("level_")},
                "verdicts_by_type": {k[5:]: n for k, n in c.items() if k.startswith("type_")},
                "running": self._thread is not None and self._thread.is_alive(),
                "accepting": self._accepting, "uptime_s": now - self._started}

    def compile_decode_steps(self, timeout: float | None = None) -> None:
        """Has the loop compile the decode step at every (rows, length) bucket, at its next
        turn with no busy slot, and waits for it (starts the loop if need be)."""
        done = threading.Event()
        with self._cond:
            self._compile_asked = done
            self._cond.notify()
        self.start()
        if not done.wait(timeout):
            raise TimeoutError(f"the decode steps were not compiled within {timeout} s")

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops accepting; with `drain` finishes every accepted request, else cancels them;
        then joins the loop thread."""
        with self._cond:
            self._accepting, self._stopping, self._abort = False, True, self._abort or not drain
            self._cond.notify()
        self.start()  # requests queued before start() still get their "done"
        self._thread.join(timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # Checks (caller's thread) -------------------------------------------------------------
    def _check(self, r: EngineRequest) -> tuple[list[int], np.ndarray | None]:
        """(prompt ids without a hint, pixel_values f32 or None) of a valid request;
        BadRequest naming what is wrong."""
        r.check(self.config.text.vocab_size)
        if len(r.prompt) > self.max_prompt_chars:
            raise BadRequest(f"prompt of {len(r.prompt)} characters exceeds the context length {self.max_length}: "
                             f"that many tokens spell at most {self.max_prompt_chars} characters")
        if r.safety and not self.inference.model.has_safety:
            raise BadRequest("this checkpoint has no safety modules; send the request with safety off")
        pixels = None if r.pixel_values is None else self._pixels(r.pixel_values)
        with self._tokenize_lock:
            ids = self._prompt(r, None)
        room = self._hint_room if r.safety and pixels is not None else 0
        if len(ids) + room + r.max_tokens > self.max_length:
            hint = f" (+ up to {room} for a safety hint)" if room else ""
            raise BadRequest(f"prompt of {len(ids)} tokens{hint} + max_tokens={r.max_tokens} exceeds "
                             f"the context length {self.max_length}")
        return ids, pixels

    def _pixels(self, pixels) -> np.ndarray:
        size = self.config.vision.image_size
        pixels = np.asarray(pixels, np.float32)
        if pixels.shape != (size, size, 3) or not np.all(np.isfinite(pixels)):
            raise BadRequest(f"pixel_values must be a finite float array [{size}, {size}, 3] "
                             f"(preprocessed), got shape {pixels.shape}")
        return pixels

    def _prompt(self, r: EngineRequest, hint: str | None) -> list[int]:
        """The prompt's ids (call under `_tokenize_lock`); a text-only prompt has no image and
        no hint (the verdict needs an image)."""
        builder = self.builders[(r.safety, r.prompt_format)]
        if r.pixel_values is None:
            return builder.encoder.encode_prompt([Turn(HUMAN, r.prompt)], image=False).tolist()
        return builder.build(r.prompt, hint)

    def _longest_hint(self, margin: int = 4) -> int:
        """The most tokens a hint adds to a prompt (the room kept for it at submit), plus a
        margin: the tokens at the seams around a hint depend a little on the question."""
        if not self.inference.model.has_safety:
            return 0
        hints, room = self.inference.hints, 0
        with self._tokenize_lock:
            for f in PROMPT_FORMATS:
                builder, plain = self.builders[(True, f)], len(self.builders[(True, f)].build("?"))
                room = max(room, *(len(builder.build("?", h)) - plain
                                   for h in [*hints.hints.values(), hints.fail_closed]))
        return room + margin

    # The loop (engine thread) ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._incoming or self._ready or self._busy() or self._stopping
                           or self._compile_asked):
                    self._cond.wait()
                compile_asked = None if self._busy() else self._compile_asked
                if compile_asked:
                    self._compile_asked = None
                abort, dropped = self._abort, [*self._incoming] if self._abort else []
                if abort:
                    self._incoming.clear()
            if compile_asked:
                try:
                    self._compile_idle_steps()
                except Exception:  # the steps compile again when requests need them
                    _log.exception("compiling the decode steps failed")
                    self._fresh_cache()
                compile_asked.set()
            if abort:  # shutdown(drain=False)
                for row in [*dropped, *self._in_flight()]:
                    self._finish(row, "cancelled")
                self._ready.clear()
            if self._stopping and not (self._incoming or self._ready or self._busy()):
                if self._compile_asked:  # asked during the last turns: nothing is left to serve
                    self._compile_asked.set()
                return
            try:
                self._turn()
            except Exception as e:  # a bug outside the guarded steps: fail what is in flight
                _log.exception("engine turn failed")
                for row in self._in_flight():
                    self._finish(row, "error", f"{type(e).__name__}: {e}")
                self._ready.clear()
                self._fresh_cache()
            self._verdicting = []

    def _in_flight(self) -> list[_Row]:
        """The requests the loop holds: getting a verdict, waiting for a slot, in a slot."""
        return [*self._verdicting, *self._ready, *(r for r in self._rows if r is not None)]

    def _turn(self) -> None:
        for row in [*self._ready, *(r for r in self._rows if r is not None)]:
            if row.handle.cancelled:
                self._finish(row, "cancelled")
        self._ready = collections.deque(r for r in self._ready if not r.finished)
        free = self.slots - self._busy()
        with self._cond:
            gone = [r for r in self._incoming if r.handle.cancelled]
            self._incoming = collections.deque(r for r in self._incoming if not r.handle.cancelled)
            batch = [self._incoming.popleft() for _ in range(min(free - len(self._ready), len(self._incoming)))]
        for row in gone:
            self._finish(row, "cancelled")
        if batch:
            self._verdicting = batch
            self._give_verdicts(batch)
            self._verdicting = []
        self._admit()
        if self._busy():
            self._decode()

    def _give_verdicts(self, rows: list[_Row]) -> None:
        """One encode call for the batch's images; the policy's hint or block for each."""
        images = [r for r in rows if r.pixels is not None]
        verdicts = {}
        try:
            if images:
                with self._timed("verdict"):
                    pixels = np.stack([r.pixels for r in images])
                    features, level, kind = self.decoder.encode(pixels, [r.ids[0] for r in images],
                                                                self.inference.model.has_safety)
                for row, f in zip(images, features):
                    row.features = f
                if level is not None:
                    verdicts = dict(zip(images, self.inference.policy.verdicts(level, kind, self.inference.hints)))
        except Exception as e:
            _log.exception("verdicts failed")
            for row in rows:
                self._finish(row, "error", f"{type(e).__name__}: {e}")
            return
        for row in rows:
            verdict = verdicts.get(row) if row.request.safety else None
            if verdict is not None:
                self._count(f"level_{verdict.risk_level}")
                self._count(f"type_{verdict.risk_type_name}")
            self._say_verdict(row, verdict)
            if row.finished:
                continue
            if verdict is not None and verdict.action == "block":
                self._emit(row, EngineEvent("text", text=self.inference.policy.refusal))
                self._finish(row, "blocked")
                continue
            if verdict is not None and verdict.hint is not None:
                try:
                    with self._tokenize_lock:
                        row.ids = row.handle.prompt_ids = self._prompt(row.request, verdict.hint)
                except Exception as e:
                    _log.exception("prompt with a hint failed")
                    self._finish(row, "error", f"{type(e).__name__}: {e}")
                    continue
            self._ready.append(row)

    def _admit(self) -> None:
        """Fills free slots from the ready queue, one prefill each; whatever one request's
        prefill raises ends that request alone."""
        while self._ready and self._busy() < self.slots:
            row = self._ready.popleft()
            try:
                self._prefill(row, self._rows.index(None))
            except Exception as e:
                _log.exception("prefill failed")
                self._finish(row, "error", f"{type(e).__name__}: {e}")
                self._fresh_cache()

    def _prefill(self, row: _Row, slot: int) -> None:
        """The row's prompt into `slot` of the cache; its first token."""
        r, n = row.request, len(row.ids)
        if n + r.max_tokens > self.max_length:  # a hint longer than the room kept for it
            self._finish(row, "error", f"prompt of {n} tokens with its safety hint + max_tokens="
                                       f"{r.max_tokens} exceeds the context length {self.max_length}")
            return
        ids = np.full((1, bucket(n, self.prompt_buckets, "prompt length")), self.decoder.pad_id, np.int32)
        ids[0, :n] = row.ids
        rule = PerRow(np.float32([r.temperature]), np.int32([r.top_k]), np.float32([r.top_p]))
        seed = np.uint32([r.seed % 2**32])
        features = None if row.features is None else row.features[None]
        with self._timed("prefill"):
            token, self._cache = programs.prefill(
                self.decoder.graphdef, self.decoder.state, self._cache, ids, np.int32(n), features,
                np.int32(slot), rule, seed, np.zeros(1, np.int32),
                use_safety=r.safety and self.inference.model.has_safety)
            token = int(token)
        self._count("prompt_tokens", n)
        row.slot, row.admitted, self._rows[slot] = slot, time.monotonic(), row
        self._seeds[slot] = seed[0]
        for name, value in (("temperature", r.temperature), ("top_k", r.top_k), ("top_p", r.top_p)):
            self._rule[name][slot] = value
        self._tokens_out(1)
        self._take(row, token)

    def _compile_idle_steps(self) -> None:
        """Runs the decode step once at every shape `_decode_shape` can choose, with every row
        idle: no index or mask bit changes (a free row's entries are garbage until its next
        insert)."""
        start = time.perf_counter()
        shapes = sorted({self._step_shape(r, n) for r in self.row_buckets for n in self.length_buckets})
        for rows, length in shapes:
            self._step(rows, length, np.zeros(rows, bool), np.zeros(rows, np.int32))
        _log.info("engine: %d decode step shapes (rows, cache slots) ready in %.1f s: %s", len(shapes),
                  time.perf_counter() - start, shapes)

    def _step_shape(self, rows: int, length: int) -> tuple[int, int]:
        """The decode step's (rows, length) for busy requests within `rows` rows and `length`
        slots (both buckets). Fewer rows or slots than the whole cache are read through a copy
        (XLA's dot takes no strided operand), which a step of every row pays only for a corner
        much shorter than the cache."""
        if rows == self.slots and 4 * length > self.max_length:
            return rows, self.max_length
        return rows, length

    def _decode_shape(self) -> tuple[int, int]:
        """(rows, length) of this turn's decode step, from the row bucket holding every busy
        slot and the length bucket holding every busy request's next position."""
        busy = [(slot, len(r.ids) + len(r.generated)) for slot, r in enumerate(self._rows) if r is not None]
        return self._step_shape(bucket(max(s for s, _ in busy) + 1, self.row_buckets, "slot"),
                                bucket(max(n for _, n in busy), self.length_buckets, "position"))

    def _step(self, rows: int, length: int, active: np.ndarray, steps: np.ndarray):
        """The decode step over slots 0..rows-1 and cache slots 0..length-1, each slot with
        its last token, sampling rule and seed: next tokens [rows] (a device array)."""
        tokens, self._cache = programs.decode_step(
            self.decoder.graphdef, self.decoder.state, self._cache, self._last[:rows], active,
            PerRow(**{k: v[:rows] for k, v in self._rule.items()}), self._seeds[:rows], steps,
            rows=rows, length=length)
        return tokens

    def _decode(self) -> None:
        """One decode step over the slots of `_decode_shape`."""
        rows, length = self._decode_shape()
        active = np.array([r is not None for r in self._rows[:rows]])
        steps = np.array([len(r.generated) if r else 0 for r in self._rows[:rows]], np.int32)
        try:
            with self._timed("decode") as took:
                tokens = np.asarray(self._step(rows, length, active, steps))
        except Exception as e:
            _log.exception("decode step failed")
            for row in self._rows:
                if row is not None:
                    self._finish(row, "error", f"{type(e).__name__}: {e}")
            self._fresh_cache()
            return
        self._tokens_out(int(active.sum()), took["s"])
        for slot, row in enumerate(self._rows[:rows]):
            if row is not None:
                try:
                    self._take(row, int(tokens[slot]))
                except Exception as e:  # e.g. its detokenizer: that request alone ends
                    _log.exception("request %d's token failed", row.handle.id)
                    self._finish(row, "error", f"{type(e).__name__}: {e}")

    def _take(self, row: _Row, token: int) -> None:
        """A sampled token: text out, or the request's end."""
        row.generated.append(token)
        self._last[row.slot] = token
        row.first_token = row.first_token or time.monotonic()
        if token == self.decoder.eos_id:
            self._finish(row, "stop")
            return
        text = row.detok.push(token)
        if text:
            self._emit(row, EngineEvent("text", text=text))
        if len(row.generated) >= row.request.max_tokens:
            self._finish(row, "length")


    # Events --------------------------------------------------------------------------------
    def _say_verdict(self, row: _Row, verdict: Verdict | None) -> None:
        row.said_verdict = True
        row.handle.verdict, row.handle.action = verdict, verdict and verdict.action
        self._emit(row, EngineEvent("verdict", verdict=verdict, action=verdict and verdict.action))

    def _emit(self, row: _Row, event: EngineEvent) -> None:
        """Hands an event to the caller; a callback that raises ends its request ("error")."""
        if row.finished:
            return
        if event.kind == "text":
            row.handle.text += event.text
        if row.on_event is None:
            return
        try:
            row.on_event(event)
        except Exception as e:
            _log.exception("on_event of request %d raised", row.handle.id)
            if event.kind != "done":
                self._finish(row, "error", f"on_event raised {type(e).__name__}: {e}")

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        """The request's last event (once): its slot is free for the next turn."""
        if row.finished:
            return
        if not row.said_verdict:
            self._say_verdict(row, None)
        if row.slot is not None and self._rows[row.slot] is row:
            self._rows[row.slot] = None
        if reason in ("stop", "length") and not row.finished:
            tail = row.detok.flush()
            if tail:
                self._emit(row, EngineEvent("text", text=tail))
        if row.finished:  # the last text's callback raised: "done" with the error was sent
            return
        now = time.monotonic()
        since = lambda t: None if t is None else t - row.submitted
        event = EngineEvent("done", finish_reason=reason, prompt_tokens=len(row.ids),
                            completion_tokens=len(row.generated), error=error,
                            timings={"queue_s": since(row.admitted), "ttft_s": since(row.first_token),
                                     "total_s": now - row.submitted})
        row.handle.done_event = event
        self._emit(row, event)
        row.finished = True
        self._count(f"finished_{reason}")
        row.handle._done.set()

    # Helpers -------------------------------------------------------------------------------
    def _busy(self) -> int:
        return sum(r is not None for r in self._rows)

    @contextlib.contextmanager
    def _timed(self, program: str):
        """Counts a device program's calls ({program}s) and time ({program}_us, busy_us);
        yields a dict that holds the seconds ("s") afterwards."""
        start, took = time.perf_counter(), {}
        try:
            yield took
        finally:
            took["s"] = spent = time.perf_counter() - start
            self._count(f"{program}_us", int(spent * 1e6))
            self._count("busy_us", int(spent * 1e6))
            self._count(f"{program}s")

    def _count(self, key: str, n: int = 1) -> None:
        with self._cond:
            self._counts[key] += n

    def _tokens_out(self, n: int, decode_s: float = 0.0) -> None:
        """n tokens came out now, from a decode step of `decode_s` seconds (0: a prefill)."""
        with self._cond:
            self._counts["tokens"] += n
            self._recent.append((time.monotonic(), n, decode_s))

    def _fresh_cache(self) -> None:
        """After a failed program: if the donated cache is gone, a new one, and the requests
        whose keys and values it held end with an error."""
        if not any(buf.is_deleted() for buf in (*self._cache.k, *self._cache.v)):
            return
        for row in self._rows:
            if row is not None:
                self._finish(row, "error", "the KV cache was lost to an earlier failure")
        self._cache = new_cache(self.config, self.slots, self.max_length, per_row=True, like=self.decoder.state)
