"""Greedy decode speed: our jitted sampler vs HF `LlavaForConditionalGeneration.generate`.

    python benchmarks/sample_vs_hf.py [--new_tokens 32] [--only tiny,350m,350m_bf16]

Both run the same random weights (HF's init, copied into ours with the converter's key
table) on the same prompts (BOS, the image positions, random text ids), safety off, with
EOS disabled so every row generates `new_tokens`. Decode tokens/s exclude the prefill: each
side notes when its first token is out (our per-step callback, an HF streamer) and counts
rows * (new_tokens - 1) over the time after that. Best of `--repeats` runs after a warm-up.
Then the prefill: seconds from pixels to the first token for a prompt of the image and
`--prefill_text` text tokens, batch 1. Prints both tables, then
`ratio_tiny=... ratio_350m=... ratio_350m_bf16=... ratio_prefill_tiny=...` (batch 1; a ratio
is HF time / ours).
"""

from __future__ import annotations

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from checkpoints_tools.export_hf import hf_config  # noqa: E402
from checkpoints_tools.keymap import canonical_hf_key, llava_rules  # noqa: E402
from configs.model import model_config  # noqa: E402
from safevlm_jax.checkpoint.format import abstract_model  # noqa: E402
from safevlm_jax.checkpoint.io import path_str  # noqa: E402
from safevlm_jax.config import ModelConfig, SafetyConfig, TextConfig, VisionConfig  # noqa: E402
from safevlm_jax.inference.decode import NEW_TOKEN_BUCKETS, Decoder  # noqa: E402

flags.DEFINE_integer("new_tokens", 128, "tokens generated per row")
flags.DEFINE_integer("repeats", 2, "measured runs per case (best is kept)")
flags.DEFINE_list("only", ["tiny", "350m", "350m_bf16"], "cases to run")
flags.DEFINE_list("batches", ["1", "8"], "batch sizes")
flags.DEFINE_integer("prefill_text", 440, "text tokens after the image in the prefill prompt (batch 1)")
FLAGS = flags.FLAGS


def config_350m(dtype: str) -> ModelConfig:
    """A LLaMA decoder of ~370M parameters with LLaVA's vocabulary and ids, a small CLIP tower
    (64 image positions) so that prefill stays cheap; safety modules off (HF has none)."""
    return ModelConfig(
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                            num_attention_heads=4, image_size=112, patch_size=14),
        text=TextConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
        safety=SafetyConfig(enabled=False), dtype=dtype, param_dtype=dtype)


CASES = {"tiny": lambda: model_config("tiny").replace(safety=SafetyConfig(enabled=False)),
         "350m": lambda: config_350m("float32"), "350m_bf16": lambda: config_350m("bfloat16")}


def build_pair(config: ModelConfig):
    """(HF model, our model) with the same random weights, in `config.param_dtype`."""
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(hf_config(config)).eval()
    hf.to(getattr(torch, config.param_dtype))
    rules = {r.hf: r for r in llava_rules(config)}
    flat = {}
    for key, tensor in hf.state_dict().items():
        rule = rules[canonical_hf_key(key)]
        flat.update(zip(rule.jax, rule.transform.to_jax(tensor.float().numpy())))
    graphdef, params = nnx.split(abstract_model(config), nnx.Param)
    for path, var in nnx.to_flat_state(params):
        var.set_value(jnp.asarray(flat.pop(path_str(path)), config.param_dtype))
    assert not flat, f"HF weights without a place: {sorted(flat)[:5]}"
    return hf, nnx.merge(graphdef, params)


def prompts(config: ModelConfig, batch: int, text: int = 20) -> tuple[list[list[int]], np.ndarray]:
    rng = np.random.default_rng(1)
    image = [config.image_token_index] * config.num_image_features
    ids = [[1] + image + rng.integers(3, 500, size=text).tolist() for _ in range(batch)]
    pixels = rng.normal(size=(batch, config.vision.image_size, config.vision.image_size, 3))
    return ids, pixels.astype(np.float32)


class _FirstToken(transformers.generation.streamers.BaseStreamer):
    """HF calls put() with the prompt, then once per generated token."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def run_ours(decoder: Decoder, ids, pixels, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Decode tokens/s (prefill excluded) and the generated ids. Two runs of the same compiled
    program (same new-token bucket), `short` and `new_tokens` steps, without per-step host
    callbacks: decode rate = extra tokens / extra time."""
    features, _, _ = decoder.encode(pixels, [p[0] for p in ids], use_safety=False)
    short = max([b for b in NEW_TOKEN_BUCKETS if b < new_tokens], default=0) + 1

    def seconds(n):
        start = time.perf_counter()
        gen = decoder.generate(ids, features, max_new_tokens=n, use_safety=False)
        return time.perf_counter() - start, gen.tokens

    (t_short, _), (t_long, tokens) = seconds(short), seconds(new_tokens)
    return len(ids) * (new_tokens - short) / (t_long - t_short), tokens


def prefill_ours(decoder: Decoder, ids, pixels) -> float:
    """Seconds from pixels and ids to the first generated token (vision tower included)."""
    start = time.perf_counter()
    features, _, _ = decoder.encode(pixels, [p[0] for p in ids], use_safety=False)
    decoder.generate(ids, features, max_new_tokens=1, use_safety=False)
    return time.perf_counter() - start


def run_hf(hf, ids, pixels, new_tokens: int) -> tuple[float, list[list[int]], float]:
    """Decode tokens/s (prefill excluded), the generated ids, and the seconds from `generate`
    to its first token out (the streamer's second call)."""
    streamer = _FirstToken()
    with torch.no_grad():
        start = time.perf_counter()
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones(len(ids), len(ids[0]), dtype=torch.long),
                          pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)).to(hf.dtype),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0, streamer=streamer)
        total = time.perf_counter() - start
    first = streamer.first - start
    return len(ids) * (new_tokens - 1) / (total - first), out[:, len(ids[0]):].tolist(), first


def read_bandwidth(gib: float = 1.0) -> float:
    """Bytes/s of a jitted f32 sum over `gib` GiB (this machine's weight-streaming rate)."""
    x = jnp.ones((int(gib * 2**28),), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        total(x).block_until_ready()
    return 5 * x.nbytes / (time.perf_counter() - start)


def decode_bytes(model) -> int:
    """Weight bytes one decode step reads: every LLM parameter but the embedding table (one
    row of it is gathered), unless the LM head is tied to it."""
    lm = model.language_model
    flat = nnx.to_flat_state(nnx.state(lm, nnx.Param))
    tied = lm.lm_head is None
    return sum(v.get_value().nbytes for p, v in flat if tied or "embed_tokens" not in p)


def best(fn, repeats: int):
    runs = [fn() for _ in range(repeats)]
    return max(r[0] for r in runs), runs[0][1]


def main(argv) -> None:
    del argv
    torch.set_num_threads(os.cpu_count() or 1)
    rows, prefills, ratios = [], [], {}
    bandwidth = read_bandwidth()
    for case in FLAGS.only:
        config = CASES[case]()
        hf, ours = build_pair(config)
        n_params = sum(p.numel() for p in hf.parameters())
        floor_ms = decode_bytes(ours) / bandwidth * 1e3
        decoder = Decoder(ours, eos_id=-1, pad_id=0)
        for batch in map(int, FLAGS.batches):
            ids, pixels = prompts(config, batch)
            n = FLAGS.new_tokens
            run_ours(decoder, ids, pixels, n)  # compile both programs it times
            ours_tps, ours_ids = best(functools.partial(run_ours, decoder, ids, pixels, n), FLAGS.repeats)
            run_hf(hf, ids, pixels, 2)
            hf_tps, hf_ids = best(functools.partial(run_hf, hf, ids, pixels, n), FLAGS.repeats)
            same = ours_ids == hf_ids
            rows.append((case, f"{n_params / 1e6:.0f}M", config.param_dtype, batch, ours_tps, hf_tps,
                         ours_tps / hf_tps, same, floor_ms * ours_tps / batch / 1e3))
            print(f"{case} batch {batch}: ours {ours_tps:.1f} tok/s, HF {hf_tps:.1f} tok/s, "
                  f"same tokens: {same}", file=sys.stderr, flush=True)
            if batch == 1:
                ratios[case] = ours_tps / hf_tps
        ids, pixels = prompts(config, 1, FLAGS.prefill_text)
        prefill_ours(decoder, ids, pixels)
        run_hf(hf, ids, pixels, 2)
        ours_s = min(prefill_ours(decoder, ids, pixels) for _ in range(FLAGS.repeats))
        hf_s = min(run_hf(hf, ids, pixels, 2)[2] for _ in range(FLAGS.repeats))
        prefills.append((case, config.param_dtype, len(ids[0]), ours_s, hf_s))
        ratios[f"prefill_{case}"] = hf_s / ours_s
        del hf, ours, decoder
    print(f"weight streaming measured at {bandwidth / 1e9:.1f} GB/s; 'of floor' = (weight bytes / that "
          f"rate) / our time per decode step")
    print(f"{'case':<10} {'params':>7} {'dtype':>9} {'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} "
          f"{'ratio':>6} {'same ids':>8} {'of floor':>8}")
    for case, params, dtype, batch, o, h, r, same, floor in rows:
        print(f"{case:<10} {params:>7} {dtype:>9} {batch:>5} {o:>11.1f} {h:>9.1f} {r:>6.2f} {str(same):>8} "
              f"{floor:>8.0%}")
    print(f"\n{'prefill':<10} {'dtype':>9} {'tokens':>6} {'ours s':>7} {'HF s':>7} {'ratio':>6}  (batch 1, "
          "pixels to first token)")
    for case, dtype, tokens, o, h in prefills:
        print(f"{case:<10} {dtype:>9} {tokens:>6} {o:>7.3f} {h:>7.3f} {h / o:>6.2f}")
    print(" ".join(f"ratio_{key}={value:.2f}" for key, value in ratios.items()))


if __name__ == "__main__":
    app.run(main)
