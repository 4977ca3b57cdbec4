"""Decode step time with and without a grammar mask (constrained decoding, `response_format`).

    python benchmarks/constrained_step.py [--slots 8] [--max_length 512] [--steps 50]

On the demo model, every row busy: the plain step at the corner the scheduler picks for short
rows and at the whole state, and the masked variant (`programs.step_program` with a bitmask
[rows, ceil(V / 32)] int32: the one shape it runs at, the whole state), plus the host's cost of
llguidance filling one row's mask. Rows without a grammar never pay for a mask: the masked
variant runs only while a constrained row decodes. Last line: `unmasked_corner_ms=...
unmasked_full_ms=... masked_full_ms=... mask_fill_ms=... masked_over_unmasked_full=...`
(medians, the variants interleaved).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("slots", 8, "rows of the decode state")
flags.DEFINE_integer("max_length", 512, "the engine's context")
flags.DEFINE_integer("steps", 50, "steps timed per variant")
FLAGS = flags.FLAGS
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name", "n"]}


def median_ms(fns, steps: int) -> list[float]:
    """Each of `fns` timed `steps` times, interleaved (a load that comes and goes hits them alike)."""
    times = [[] for _ in fns]
    for _ in range(steps):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [1e3 * float(np.median(t)) for t in times]


def main(argv):
    del argv
    from safevlm_jax.checkpoint.demo import DEMO_DIR
    from safevlm_jax.inference.engine import Engine
    from safevlm_jax.inference.pipeline import SafeVLMInference
    from safevlm_jax.inference.sampling import RowSampling

    engine = Engine.from_inference(SafeVLMInference.from_checkpoint(DEMO_DIR), slots=FLAGS.slots,
                                   max_length=FLAGS.max_length)
    engine.warm_up()
    engine.shutdown()
    runner, rule = engine.runner, RowSampling.greedy(1)
    tokens, prefix = runner.prefill(runner.new_prefix(1, runner.length_buckets[0]), [[1] * 16], [0],
                                    [engine.executor._blank()], rule, False)
    for row in range(FLAGS.slots):  # every row busy, far from its limit
        runner.insert(prefix, tokens, [row], rule, [10**6])
    corner = engine.scheduler._decode_shape([type("Row", (), {"row": FLAGS.slots - 1, "cached": 64,
                                                              "grammar": None})()])
    full = engine.scheduler.masked_shape()
    bitmask = np.full((full[0], engine.executor.mask_words), -1, np.int32)
    row = engine.grammars.matcher(engine.grammars.compile(SCHEMA))
    rows = [("plain step, corner", corner, lambda: runner.step(*corner)),
            ("plain step, whole state", full, lambda: runner.step(*full)),
            ("masked step, whole state", full, lambda: runner.step(*full, bitmask)),
            ("llguidance: one row's mask", None, lambda: row.fill(bitmask[0]))]
    for _, _, fn in rows:
        fn()
    a, b, c, d = median_ms([fn for *_, fn in rows], FLAGS.steps)
    print(f"{'what':30s} {'(rows, length)':>16s} {'ms (median)':>12s}")
    for (name, shape, _), ms in zip(rows, (a, b, c, d)):
        print(f"{name:30s} {str(shape or ''):>16s} {ms:12.3f}")
    print(f"unmasked_corner_ms={a:.3f} unmasked_full_ms={b:.3f} masked_full_ms={c:.3f} mask_fill_ms={d:.3f} "
          f"masked_over_unmasked_full={c / b:.3f}")


if __name__ == "__main__":
    app.run(main)
