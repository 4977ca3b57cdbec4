"""Time to first token of a conversation's second turn about the same image vs its first.

    python benchmarks/chat_turns.py [--config 350m|tiny] [--words 250] [--conversations 3]

Writes a random checkpoint of the chosen config (safety modules on; `350m` is the ~350M f32
LLaMA of `sample_vs_hf.py`, 64 image positions + 64 safety tokens), runs the serving `Engine`
in-process (warmed up: nothing compiles while measuring) and, per conversation, a new image:
turn 1 asks a question of --words words (a ~600-token prompt for 350m), turn 2 resends the
history (the question, an answer, a new question) as a chat client does. The answer turn 2
resends is --max_tokens plain words, as long as the answer turn 1 generated: a random model's
answer is ids of no word, whose text tokenizes to ~10 times as many ids, where a trained
model's text gives back about its own ids. So turn 2 reuses turn 1's prompt and prefills the
answer and the new question (~50 tokens). Time to first token
is from `submit` to the first text event. The policy adds no hint, so turn 1's prompt is a
prefix of turn 2's. The same conversations run again on an engine without caches (no prefix,
no verdict reuse) for comparison. Last line: `config=... prompt_tokens=... ttft_turn1_s=...
ttft_turn2_s=... ratio=... ratio_without_cache=...` (ratio: turn 2 / turn 1, medians).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_enum("config", "350m", ["tiny", "350m"], "model config of the random checkpoint")
flags.DEFINE_integer("words", 250, "words of the first question (~1.7 tokens each)")
flags.DEFINE_integer("conversations", 3, "conversations measured (each about a new image)")
flags.DEFINE_integer("max_tokens", 32, "tokens per answer (and words of the answer turn 2 resends)")
flags.DEFINE_integer("max_length", 2048, "the engine's context (turn 2 resends turn 1)")
flags.DEFINE_string("workdir", None, "where the random checkpoint is kept (default: a temp dir)")
FLAGS = flags.FLAGS
WORDS = "what is shown in this image describe the picture safe hint politics privacy answer".split()


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def ttft(engine, request) -> tuple[float, object]:
    first = []
    start = time.perf_counter()
    handle = engine.submit(request, lambda e: first.append(time.perf_counter()) if e.kind == "text" and not first
                           else None)
    if not handle.wait(600):
        raise RuntimeError("a request did not finish in 600 s")
    if handle.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"a request ended with {handle.finish_reason}: {handle.done_event.error}")
    return first[0] - start, handle


def conversations(engine, pixels: list[np.ndarray]) -> list[tuple[float, float, int]]:
    """(turn-1 TTFT, turn-2 TTFT, turn-1 prompt tokens) per image."""
    from safevlm_jax.data.records import GPT, HUMAN, Turn
    from safevlm_jax.inference.engine import EngineRequest
    from safevlm_jax.safety.prompt import Conversation

    question = words(FLAGS.words)
    answer = words(FLAGS.max_tokens, start=3)
    out = []
    for image in pixels:
        t1, one = ttft(engine, EngineRequest(image, question, max_tokens=FLAGS.max_tokens))
        turns = (Turn(HUMAN, question), Turn(GPT, answer), Turn(HUMAN, "and what else is there"))
        t2, _ = ttft(engine, EngineRequest(image, Conversation(turns), max_tokens=FLAGS.max_tokens))
        out.append((t1, t2, len(one.prompt_ids)))
    return out


def main(argv) -> None:
    del argv
    from benchmarks.random_models import write_checkpoint
    from safevlm_jax.inference.engine import Engine
    from safevlm_jax.safety.policy import parse_policy

    quiet = parse_policy({"rules": {t: {} for t in range(6)}})  # no hint: turn 1 is a prefix of turn 2
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(FLAGS.workdir or tmp, FLAGS.config)
        rows = {}
        for name, kw in (("cached", {}), ("no cache", dict(prefix_cache_bytes=0, verdict_cache_bytes=0))):
            engine = Engine.from_checkpoint(checkpoint, policy=quiet, slots=2, max_length=FLAGS.max_length, **kw)
            engine.start()
            start = time.perf_counter()
            engine.warm_up()
            print(f"{name}: warm-up {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            size = engine.config.vision.image_size
            rng = np.random.default_rng(len(rows))
            pixels = [rng.normal(size=(size, size, 3)).astype(np.float32) for _ in range(FLAGS.conversations)]
            rows[name] = conversations(engine, pixels)
            stats = engine.stats()
            engine.shutdown()
            print(f"{name}: prefix hits {stats.prefix_hits}, reused tokens {stats.reused_tokens}, verdict cache "
                  f"hits {stats.verdict_cache_hits}", file=sys.stderr, flush=True)
    print(f"{'engine':<9} {'prompt':>6} {'turn 1 TTFT s':>13} {'turn 2 TTFT s':>13} {'ratio':>6}")
    med = {}
    for name, got in rows.items():
        t1, t2 = (float(np.median([r[i] for r in got])) for i in (0, 1))
        med[name] = (t1, t2)
        for a, b, n in got:
            print(f"{name:<9} {n:>6} {a:>13.3f} {b:>13.3f} {b / a:>6.2f}")
    (t1, t2), (c1, c2) = med["cached"], med["no cache"]
    print(f"config={FLAGS.config} prompt_tokens={rows['cached'][0][2]} ttft_turn1_s={t1:.3f} ttft_turn2_s={t2:.3f} "
          f"ratio={t2 / t1:.2f} ratio_without_cache={c2 / c1:.2f}")


if __name__ == "__main__":
    app.run(main)
