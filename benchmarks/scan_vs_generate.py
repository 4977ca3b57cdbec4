"""Images/s of guard scanning vs sampling the same images with the full model.

    python benchmarks/scan_vs_generate.py [--configs tiny,350m] [--batch 4] [--reps 1]

Per config (random weights; only speed is measured), on the default device:
  scan         `guard.Guard`: CLIP to the feature layer + safety projector + head
  generate@1   the sampler's path (`Runner.encode` then `Runner.generate`) with
               max_new_tokens=1: CLIP + head + the LLM prefill of the whole prompt
  generate@32  the same with 32 new tokens (EOS disabled, so all 32 are decoded)
Pixels are made once and reused: image decoding is the same host cost on both sides and is
left out. Every path is compiled and run once before it is timed. The last line is for the
last config: `speedup_vs_prefill=... speedup_vs_generate32=...`.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from configs.model import model_config  # noqa: E402
from safevlm_jax import cli  # noqa: E402
from safevlm_jax.config import ModelConfig, SafetyConfig, TextConfig, VisionConfig  # noqa: E402
from safevlm_jax.guard.model import Guard  # noqa: E402
from safevlm_jax.inference.requests import SamplingParams  # noqa: E402
from safevlm_jax.inference.runner import Runner  # noqa: E402
from safevlm_jax.models.safevlm import SafeVLM  # noqa: E402

QUESTION_TOKENS = 40  # system text + question + "ASSISTANT:" after the image, LLaVA-like


def config_350m() -> ModelConfig:
    """~350M parameters in LLaVA-1.5's layout: a small CLIP at 336 px (576 patches), a
    1024-wide 20-layer LLaMA with the full 32064 vocabulary, the default safety modules (`SafetyConfig()`)."""
    return ModelConfig(
        vision=VisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                            num_attention_heads=6),
        text=TextConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
                        num_attention_heads=16, num_key_value_heads=16,
                        max_position_embeddings=2048),
        safety=SafetyConfig(),
    )


CONFIGS = {"tiny": lambda: model_config("tiny"), "350m": config_350m}
FLAGS = flags.FlagValues()
flags.DEFINE_list("configs", ["tiny", "350m"], f"comma-separated, from {sorted(CONFIGS)}", flag_values=FLAGS)
flags.DEFINE_integer("batch", 4, "images per call", flag_values=FLAGS)
flags.DEFINE_integer("reps", 1, "timed calls per path, after one warm-up", flag_values=FLAGS)


def param_counts(model: SafeVLM) -> dict[str, int]:
    counts = {"vision": 0, "llm": 0, "safety": 0, "other": 0}
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        part = {"vision_tower": "vision", "language_model": "llm"}.get(
            path[0], "safety" if str(path[0]).startswith("safety") else "other")
        counts[part] += int(np.prod(v.get_value().shape))
    return counts


def images_per_s(fn, batch: int, reps: int) -> float:
    fn()  # compile + first run
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return batch * reps / (time.perf_counter() - start)


def bench(name: str, batch: int, reps: int) -> dict[str, float]:
    config = CONFIGS[name]()
    model = SafeVLM(config, rngs=nnx.Rngs(0))
    counts = param_counts(model)
    rng = np.random.default_rng(0)
    size = config.vision.image_size
    pixels = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    bos = 1
    prompt = ([bos] + [config.image_token_index] * model.num_image_tokens()
              + rng.integers(3, 300, QUESTION_TOKENS).tolist())
    guard = Guard(model, query_id=bos)
    runner = Runner(model, max_length=config.text.max_position_embeddings, eos_id=-1, pad_id=config.pad_token_id)

    def scan():
        guard(pixels)

    def sample(new_tokens: int):
        features, _, _ = runner.encode(pixels, [bos] * batch, True)
        runner.generate([prompt] * batch, features, [SamplingParams()] * batch, new_tokens, True)

    rates = {"scan": images_per_s(scan, batch, reps),
             "generate@1": images_per_s(lambda: sample(1), batch, reps),
             "generate@32": images_per_s(lambda: sample(32), batch, reps)}
    total = sum(counts.values())
    print(f"{name}: {total / 1e6:.1f}M params (vision {counts['vision'] / 1e6:.1f}M, llm "
          f"{counts['llm'] / 1e6:.1f}M, safety {counts['safety'] / 1e6:.1f}M), prompt "
          f"{len(prompt)} tokens, batch {batch}, {reps} timed reps, device {jax.devices()[0].device_kind}")
    return rates


def main(argv) -> None:
    del argv
    names = FLAGS.configs
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise cli.UsageError(f"unknown config(s) {unknown}; known: {sorted(CONFIGS)}")
    results = {n: bench(n, FLAGS.batch, FLAGS.reps) for n in names}
    print("\n| config | scan img/s | generate@1 img/s | generate@32 img/s | scan / gen@1 | scan / gen@32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, r in results.items():
        print(f"| {n} | {r['scan']:.2f} | {r['generate@1']:.2f} | {r['generate@32']:.2f} | "
              f"{r['scan'] / r['generate@1']:.1f}x | {r['scan'] / r['generate@32']:.1f}x |")
    last = results[names[-1]]
    print(f"speedup_vs_prefill={last['scan'] / last['generate@1']:.1f} "
          f"speedup_vs_generate32={last['scan'] / last['generate@32']:.1f}")


if __name__ == "__main__":
    cli.run(main, FLAGS)
