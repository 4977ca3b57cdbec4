"""One engine turn on the device: runs a scheduler `Plan` on a `Runner` and hands the outputs
back to the scheduler. It keeps what recent requests left behind (`caches`): the CLIP features
and verdict of recent images, and prefilled prefixes (a prompt's, and a finished request's
prompt + answer), so a request about a recent image skips CLIP and the safety head, and a
chat's next turn prefills only its new tokens. `compile_all` runs each program once (the engine's
warm-up).

A failure touches only what it can reach: a verdict batch fails its requests; a prefill chunk
its request (its prefix is its own); an insert or a decode step every request in the decode
state, which is then made anew if the failed program consumed it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import numpy as np

from safevlm_jax.inference.buckets import bucket
from safevlm_jax.inference.caches import LRU, PrefixCache
from safevlm_jax.inference.logits import RowLogits
from safevlm_jax.inference.requests import FinishReason
from safevlm_jax.inference.runner import CHUNK_BUCKETS, Runner
from safevlm_jax.inference.sampling import RowSampling
from safevlm_jax.inference.scheduler import Output, Plan, Scheduler, Seq, Status
from safevlm_jax.safety.gate import Gate

_log = logging.getLogger(__name__)


class Executor:
    """runner: the device side; scheduler and lock: the host side (every scheduler call holds
    `lock`); gate: verdicts from logits; tokenize_lock: held while the gate tokenizes;
    prefix_cache_bytes / verdict_cache_bytes: the caches' bounds."""

    def __init__(self, runner: Runner, scheduler: Scheduler, lock: threading.Condition, gate: Gate,
                 tokenize_lock: threading.Lock, *, prefix_cache_bytes: int, verdict_cache_bytes: int,
                 image_token_id: int):
        self.runner, self.scheduler, self.lock, self.gate = runner, scheduler, lock, gate
        self.tokenize_lock = tokenize_lock
        self.prefixes = PrefixCache(prefix_cache_bytes, image_token_id)
        self.images = LRU(verdict_cache_bytes)  # image hash -> (features [N, C], verdict logits)
        self.image_token_id = image_token_id
        self.mask_words = (runner.config.text.vocab_size + 31) // 32  # a grammar mask's int32 per row
        self.use_verdict = runner.config.safety.enabled
        self._pending: dict[int, object] = {}  # request id -> its prefix being prefilled
        self.blank = None

    def run(self, plan: Plan) -> Output:
        out: Output = []
        if plan.release:
            self.runner.release(plan.release)
        for row, ids, seq in plan.save:
            self._keep(self.runner.take(row, self.runner.prefix_length(len(ids))), ids, seq)
        if plan.verdict:
            out += self._verdicts(plan.verdict)
        for seq in plan.begin:
            out += self._begin(seq)
        if plan.prefill is not None and plan.prefill.status is Status.PREFILL:
            out += self._prefill(plan.prefill, plan.budget)
        if plan.decode is not None:
            out += self._decode(*plan.decode)
        return out

    def drop(self, seq: Seq) -> None:
        """Forgets a request's unfinished prefill."""
        self._pending.pop(seq.id, None)

    def compile_all(self) -> None:
        """Runs every program a turn can run once, on blank inputs, with every row free: the
        verdict at each image batch bucket, prefill chunks of every width into prefixes of
        every length (safety on and off), insert, take and reuse of each prefix length, and
        the decode step at every (rows, length) shape the scheduler can choose (and with a
        grammar mask at its one shape)."""
        start, r, safety = time.perf_counter(), self.runner, self.use_verdict
        size = r.config.vision.image_size
        for n in sorted({bucket(n, r.batch_buckets) for n in range(1, self.scheduler.rows + 1)}):
            r.encode(np.zeros((n, size, size, 3), np.float32), [self.gate.query_id] * n, safety)
        blank, rule = self._blank(), RowSampling.greedy(1)
        prefixes = {}
        for length in r.length_buckets:
            for width in sorted({min(c, length) for c in CHUNK_BUCKETS}):
                for use_safety in {False, safety}:
                    tokens, prefixes[length] = r.prefill(r.new_prefix(1, length), [[r.pad_id] * width], [0],
                                                         [blank], rule, use_safety)
            r.insert(prefixes[length], tokens, [0], rule, [1])
            r.take(0, length)
        for a in r.length_buckets:
            for b in r.length_buckets:
                r.reuse(prefixes[a], 1, b)
        r.release([0])
        shapes = self.scheduler.step_shapes()
        for rows, length in shapes:
            r.step(rows, length)
        rows, length = self.scheduler.masked_shape()
        r.step(rows, length, np.full((rows, self.mask_words), -1, np.int32))
        _log.info("engine: programs ready in %.1f s (decode step shapes %s)", time.perf_counter() - start, shapes)

    # Verdicts ---------------------------------------------------------------------------
    def _verdicts(self, seqs: list[Seq]) -> Output:
        """Features and verdict logits per image (from the cache, else one encode batch for
        the images not in it), then admission."""
        known = {s.image: self.images.get(s.image) for s in seqs if s.image is not None}
        todo = list({s.image: s for s in seqs if s.image is not None and known[s.image] is None}.values())
        try:
            if todo:
                with self._timed("verdict"):
                    features, level, kind = self.runner.encode(np.stack([s.request.pixel_values for s in todo]),
                                                               [self.gate.query_id] * len(todo), self.use_verdict)
                for i, seq in enumerate(todo):
                    known[seq.image] = (features[i], None if level is None else (level[i:i + 1], kind[i:i + 1]))
                    self.images.put(seq.image, known[seq.image], features[i].nbytes)
            kept = [known[s.image] if s.image is not None else (None, None) for s in seqs]
            verdicts = [None if logits is None else self.gate.verdicts(*logits)[0] for _, logits in kept]
        except Exception as e:  # these requests only
            _log.exception("verdicts failed")
            with self.lock:
                return [x for s in seqs for x in self.scheduler.finish(s, FinishReason.ERROR, _error(e))]
        with self.lock, self.tokenize_lock:
            self.scheduler.counters.verdict_hits += sum(s.image is not None for s in seqs) - len(todo)
            return self.scheduler.verdicts_done(seqs, verdicts, [f for f, _ in kept])

    # Prompts ----------------------------------------------------------------------------
    def _begin(self, seq: Seq) -> Output:
        """Its prefix: the longest cached one that fits, copied (or as it is when it holds all
        but the last prompt token: inserted from there, the first decode step reads that
        token), or an empty one."""
        length = self.runner.prefix_length(len(seq.prompt_ids))
        try:
            hit = self.prefixes.lookup(seq.prompt_ids, _image_key(seq))
            whole = hit is not None and hit.length == len(seq.prompt_ids) - 1
            if hit is None:
                self._pending[seq.id], reused = self.runner.new_prefix(1, length), 0
            elif whole:
                self._pending[seq.id], reused = hit.value, hit.length
            else:
                self._pending[seq.id], reused = self.runner.reuse(hit.value, hit.length, length), hit.length
        except Exception as e:
            _log.exception("prefix of request %d failed", seq.id)
            with self.lock:
                return self.scheduler.finish(seq, FinishReason.ERROR, _error(e))
        with self.lock:
            counters = self.scheduler.counters
            counters.prefix_hits += bool(reused)
            counters.reused_tokens += reused
            seq.computed, seq.whole_hit = reused, whole
        return []

    def _prefill(self, seq: Seq, budget: int) -> Output:
        """Its next chunk; after the last, its row of the decode state (a deferred request's
        prompt but its last token, which the first decode step reads)."""
        ids, start, r = seq.prompt_ids, seq.computed, seq.request
        target = len(ids) - seq.deferred
        with self.lock:
            end = start + self.scheduler.chunk(seq, budget)
        sampling = RowSampling.of([r.sampling])
        try:  # a text-only prompt runs the program of an image prompt with safety off
            features = self._blank() if seq.features is None else seq.features
            if end > start:
                with self._timed("prefill", tokens=int(end == len(ids))):
                    tokens, prefix = self.runner.prefill(
                        self._pending.pop(seq.id), [ids[start:end]], [ids[:start].count(self.image_token_id)],
                        [features], sampling, seq.use_safety and self.use_verdict)
                    self._pending[seq.id] = prefix
        except Exception as e:
            _log.exception("prefill of request %d failed", seq.id)
            with self.lock:
                return self.scheduler.finish(seq, FinishReason.ERROR, _error(e))
        if end < target:
            with self.lock:
                return self.scheduler.prefilled(seq, end, None)
        prefix = self._pending.pop(seq.id)
        try:
            self.runner.insert(prefix, ids[-1:] if seq.deferred else tokens, [seq.row], sampling, [r.max_tokens],
                               RowLogits.of([r.sampling]), first=not seq.deferred, keep=[target])
        except Exception as e:  # the decode state may be gone with it
            return self._failed_state(e, [seq])
        if not seq.whole_hit:  # else it is cached already
            self._keep(prefix, ids[:target], seq)
        with self.lock:
            if seq.deferred:
                return self.scheduler.prefilled(seq, end, None) + self.scheduler.started(seq)
            return self.scheduler.prefilled(seq, end, int(tokens[0]))

    def _blank(self):
        """CLIP features [1, N, C] of no image (zeros), for text-only prompts."""
        if self.blank is None:
            size = self.runner.config.vision.image_size
            [features], _, _ = self.runner.encode(np.zeros((1, size, size, 3), np.float32), [self.gate.query_id],
                                                  False)
            self.blank = features * 0
        return self.blank

    def _keep(self, prefix, ids: list[int], seq: Seq) -> None:
        self.prefixes.add(ids, _image_key(seq), prefix, sum(b.nbytes for b in (*prefix.k, *prefix.v)))

    # Decoding ---------------------------------------------------------------------------
    def _decode(self, rows: int, length: int) -> Output:
        """One step; when a decoding row has a grammar (it may have started in this turn's
        prefill), over the whole state with their masks (all ones elsewhere)."""
        with self.lock:
            decoding = [s for s in self.scheduler.busy if s.status is Status.DECODE]
            grammars = {s.row: s.grammar for s in decoding if s.grammar is not None}
        if grammars:
            rows, length = self.scheduler.masked_shape()
        try:
            bitmask = None
            if grammars:
                bitmask = np.full((rows, self.mask_words), -1, np.int32)
                for row, grammar in grammars.items():
                    grammar.fill(bitmask[row])
            with self._timed("decode", tokens=len(decoding)):
                tokens, done, logprobs = self.runner.step(rows, length, bitmask)
            if any(s.request.logprobs for s in decoding):
                logprobs = tuple(np.asarray(a) for a in logprobs)
            else:
                logprobs = None
        except Exception as e:
            return self._failed_state(e, decoding)
        with self.lock:
            return self.scheduler.stepped(tokens, done, logprobs)

    def _failed_state(self, e: Exception, seqs: list[Seq]) -> Output:
        """A program over the decode state failed: its requests end with the error (and every
        request in it, if the state was consumed)."""
        _log.exception("a decode state program failed")
        state = self.runner.state
        lost = any(a.is_deleted() for a in (*state.cache.k, *state.cache.v, state.done))
        with self.lock:
            if lost:
                seqs = [s for s in self.scheduler.busy if s.status is Status.DECODE] + seqs
            out = [x for s in dict.fromkeys(seqs) for x in self.scheduler.finish(s, FinishReason.ERROR, _error(e))]
        if lost:
            rows, length = self.runner.rows, self.runner.length
            self.runner.state = None
            self.runner.reset(rows, length)
        return out

    @contextlib.contextmanager
    def _timed(self, program: str, tokens: int = 0):
        start = time.perf_counter()
        yield
        with self.lock:  # only programs that ran: a failed one gave no token
            self.scheduler.counters.program(program, time.perf_counter() - start, tokens)


def _image_key(seq: Seq) -> str | None:
    """What a prompt's image positions hold: its image, with or without the safety tokens."""
    return None if seq.image is None else f"{seq.image}/{'safety' if seq.use_safety else 'plain'}"


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
