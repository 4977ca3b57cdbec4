"""Greedy decode speed: our jitted sampler vs HF `LlavaForConditionalGeneration.generate`.

    python benchmarks/sample_vs_hf.py [--new_tokens 32] [--only tiny,350m,350m_bf16]
    python benchmarks/sample_vs_hf.py --only 7b_bf16 --batches 1,8,32 --floor copy   # on a GPU

Both run the same random weights (HF's init on `--device`, copied into ours with the
converter's key table, tensor by tensor through DLPack) on the same prompts (BOS, the image
positions, random text ids), safety off, with EOS disabled so every row generates
`new_tokens`. Decode tokens/s exclude the prefill: ours is the extra tokens over the extra time
of a longer run of the same compiled program; HF's counts rows * (new_tokens - 1) over the time
after a streamer saw its first token. Best of `--repeats` runs after a warm-up. 'of floor' is the weight bytes one step reads
over the `--floor` rate measured here (a jitted sum, or a copy counting bytes read + written),
divided by our time per step. Then the prefill: seconds from pixels to the first token for a
prompt of the image and `--prefill_text` text tokens, batch 1, and the same with the safety
verdict (our model with the case's safety modules, random: the head runs first and the LLM
sees the safety tokens too; HF has no verdict). Prints the figures so far after each case and
batch (a run stopped at a time limit keeps them), then both tables, then one line of
`key=value`: `ratio_<case>` (batch 1) and `ratio_<case>_b<batch>` (HF time / ours),
`tps_`/`hf_tps_`/`floor_<case>_b<batch>`, `ratio_prefill[_verdict]_<case>`, `prefill_s_`,
`prefill_verdict_s_`, `hf_prefill_s_<case>`, `bandwidth_gbps`.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import time

import devices  # before jax: no preallocation; puts the repo root on sys.path
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from checkpoints_tools.keymap import TRANSFORMS, canonical_hf_key, llava_rules  # noqa: E402
from configs.model import model_config  # noqa: E402
from safevlm_jax.checkpoint.format import abstract_model  # noqa: E402
from safevlm_jax.checkpoint.io import path_str  # noqa: E402
from safevlm_jax.config import ModelConfig, SafetyConfig, TextConfig, VisionConfig  # noqa: E402
from safevlm_jax.inference.buckets import NEW_TOKEN_BUCKETS  # noqa: E402
from safevlm_jax.inference.requests import SamplingParams  # noqa: E402
from safevlm_jax.inference.runner import Runner  # noqa: E402
from safevlm_jax.models.safevlm import SafeVLM  # noqa: E402

flags.DEFINE_integer("new_tokens", 128, "tokens generated per row")
flags.DEFINE_integer("repeats", 2, "measured runs per case (best is kept)")
flags.DEFINE_list("only", ["tiny", "350m", "350m_bf16"], "cases to run")
flags.DEFINE_list("batches", ["1", "8"], "batch sizes")
flags.DEFINE_integer("prefill_text", 440, "text tokens after the image in the prefill prompt (batch 1)")
flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "torch device for HF (auto: JAX's GPU if any)")
flags.DEFINE_enum("floor", "read", ["read", "copy"], "bandwidth of the decode floor: a jitted sum, or a "
                  "copy (bytes read + written)")
flags.DEFINE_float("bandwidth_gib", 1.0, "GiB of f32 the bandwidth is measured over")
FLAGS = flags.FLAGS


def config_350m(dtype: str) -> ModelConfig:
    """A LLaMA decoder of ~370M parameters with LLaVA's vocabulary and ids, a small CLIP tower
    (64 image positions) so that prefill stays cheap; SPEC's safety modules (for the verdict)."""
    return ModelConfig(
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                            num_attention_heads=4, image_size=112, patch_size=14),
        text=TextConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
        safety=SafetyConfig(), dtype=dtype, param_dtype=dtype)


def config_7b_bf16() -> ModelConfig:
    """LLaVA-1.5-7B's shapes (CLIP-L/336, 576 image positions, the 32-layer LLaMA), bf16
    weights and compute, layers unrolled (the HF weights are copied per layer)."""
    return model_config("llava_7b").replace(dtype="bfloat16", param_dtype="bfloat16", scan_layers=False)


CASES = {"tiny": lambda: model_config("tiny"),
         "tiny_bf16": lambda: model_config("tiny").replace(dtype="bfloat16", param_dtype="bfloat16"),
         "350m": lambda: config_350m("float32"), "350m_bf16": lambda: config_350m("bfloat16"),
         "7b_bf16": config_7b_bf16}


def build_pair(config: ModelConfig, device: torch.device):
    """(HF model on `device`, our model) with the same random weights, in `config.param_dtype`
    (safety off: HF has none). Each HF tensor reaches JAX's default device by DLPack, and is
    transposed there: a 7B model makes no host copy."""
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.LlavaForConditionalGeneration(config.to_hf()).eval()
    hf.to(getattr(torch, config.param_dtype))
    rules = {r.hf: r for r in llava_rules(config)}
    flat = {}
    for key, tensor in hf.state_dict().items():
        rule = rules[canonical_hf_key(key)]
        assert rule.transform.parts == 1, rule  # LLaVA's tensors map one to one
        flat[rule.jax[0]] = jnp.array(TRANSFORMS[rule.transform.name][0](jax.dlpack.from_dlpack(tensor)))
    graphdef, params = nnx.split(abstract_model(config), nnx.Param)
    for path, var in nnx.to_flat_state(params):
        value = flat.pop(path_str(path))
        assert value.dtype == config.param_dtype and value.shape == var.shape, (path, value.dtype, value.shape)
        var.set_value(value)
    assert not flat, f"HF weights without a place: {sorted(flat)[:5]}"
    return hf, nnx.merge(graphdef, params)


def with_verdict(ours: SafeVLM, config: ModelConfig) -> SafeVLM:
    """`ours` plus the case's safety modules, randomly initialised: their cost, not their values."""
    safe = SafeVLM(config, rngs=nnx.Rngs(0))
    nnx.update(safe, nnx.state(ours, nnx.Param))
    return safe


def prompts(config: ModelConfig, batch: int, text: int = 20) -> tuple[list[list[int]], np.ndarray]:
    """BOS, `config.num_image_tokens` image ids (so the safety tokens too, if enabled), `text`
    random ids; pixels [batch, H, W, 3]."""
    rng = np.random.default_rng(1)
    image = [config.image_token_index] * config.num_image_tokens
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
            devices.synchronize(value.device)  # the token is computed, not only queued
            self.first = time.perf_counter()

    def end(self):
        pass


def generate(runner: Runner, ids, pixels, new_tokens: int, use_safety: bool = False) -> list[list[int]]:
    """The sampler's path (`Runner.encode`, then `Runner.generate`: prefill, insert, the
    decode loop), greedy."""
    features, _, _ = runner.encode(pixels, [p[0] for p in ids], use_safety)
    return runner.generate(ids, features, [SamplingParams()] * len(ids), new_tokens, use_safety)[0]


def run_ours(runner: Runner, ids, pixels, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Decode tokens/s (prefill excluded) and the generated ids. Two runs of the same compiled
    programs (same new-token bucket), `short` and `new_tokens` steps, without per-step host
    work: decode rate = extra tokens / extra time."""
    short = max([b for b in NEW_TOKEN_BUCKETS if b < new_tokens], default=0) + 1

    def seconds(n):
        start = time.perf_counter()
        tokens = generate(runner, ids, pixels, n)
        return time.perf_counter() - start, tokens

    (t_short, _), (t_long, tokens) = seconds(short), seconds(new_tokens)
    if t_long <= t_short:  # noise larger than the extra steps (a tiny model on a busy host)
        return float("nan"), tokens
    return len(ids) * (new_tokens - short) / (t_long - t_short), tokens


def prefill_ours(runner: Runner, ids, pixels, use_safety: bool = False) -> float:
    """Seconds from pixels and ids to the first generated token (vision tower included; with
    `use_safety` the verdict as well, which runs first)."""
    start = time.perf_counter()
    generate(runner, ids, pixels, 1, use_safety)
    return time.perf_counter() - start


def run_hf(hf, ids, pixels, new_tokens: int) -> tuple[float, list[list[int]], float]:
    """Decode tokens/s (prefill excluded), the generated ids, and the seconds from `generate`
    to its first token out (the streamer's second call)."""
    streamer, device = _FirstToken(), hf.device
    with torch.no_grad():
        start = time.perf_counter()
        out = hf.generate(input_ids=torch.tensor(ids, device=device),
                          attention_mask=torch.ones(len(ids), len(ids[0]), dtype=torch.long, device=device),
                          pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)).to(device, hf.dtype),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0, streamer=streamer)
        devices.synchronize(device)
        total = time.perf_counter() - start
    first = streamer.first - start
    return len(ids) * (new_tokens - 1) / (total - first), out[:, len(ids[0]):].tolist(), first


def bandwidth(kind: str, gib: float) -> float:
    """Bytes/s on JAX's default device over `gib` GiB of random f32, best of 5: `read`, a
    jitted sum (the rate weights stream at); `copy`, x + 1 counting bytes read and written."""
    x = jax.random.normal(jax.random.key(0), (int(gib * 2**28),), jnp.float32)
    fn, moved = (jnp.sum, x.nbytes) if kind == "read" else (lambda a: a + 1, 2 * x.nbytes)
    fn = jax.jit(fn)
    fn(x).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return moved / min(times)


def decode_bytes(model) -> int:
    """Weight bytes one decode step reads: every LLM parameter but the embedding table (one
    row of it is gathered), unless the LM head is tied to it."""
    lm = model.language_model
    flat = nnx.to_flat_state(nnx.state(lm, nnx.Param))
    tied = lm.lm_head is None
    return sum(v.get_value().nbytes for p, v in flat if tied or "embed_tokens" not in p)


def figures(out: dict[str, float]) -> str:
    return " ".join(f"{key}={value:.4g}" for key, value in out.items())


def best(fn, repeats: int):
    runs = [fn() for _ in range(repeats)]
    return max(r[0] for r in runs), runs[0][1]


def main(argv) -> None:
    del argv
    torch.set_num_threads(os.cpu_count() or 1)
    device = devices.torch_device(FLAGS.device)
    rows, prefills, out = [], [], {}
    rate = bandwidth(FLAGS.floor, FLAGS.bandwidth_gib)
    out["bandwidth_gbps"] = rate / 1e9
    for case in FLAGS.only:
        config = CASES[case]()
        plain = config.replace(safety=SafetyConfig(enabled=False))
        hf, ours = build_pair(plain, device)
        n_params = sum(p.numel() for p in hf.parameters())
        floor_ms = decode_bytes(ours) / rate * 1e3
        runner = Runner(ours, max_length=config.text.max_position_embeddings, eos_id=-1, pad_id=0)
        for batch in map(int, FLAGS.batches):
            ids, pixels = prompts(plain, batch)
            n = FLAGS.new_tokens
            start = time.perf_counter()
            run_ours(runner, ids, pixels, n)  # compiles the programs it times
            warm_s = time.perf_counter() - start
            ours_tps, ours_ids = best(functools.partial(run_ours, runner, ids, pixels, n), FLAGS.repeats)
            run_hf(hf, ids, pixels, 2)
            hf_tps, hf_ids = best(functools.partial(run_hf, hf, ids, pixels, n), FLAGS.repeats)
            same, floor = ours_ids == hf_ids, floor_ms * ours_tps / batch / 1e3
            rows.append((case, f"{n_params / 1e6:.0f}M", config.param_dtype, batch, ours_tps, hf_tps,
                         ours_tps / hf_tps, same, floor))
            print(f"{case} batch {batch}: ours {ours_tps:.1f} tok/s (compile + first run {warm_s:.1f} s), "
                  f"HF {hf_tps:.1f} tok/s, same tokens: {same}", file=sys.stderr, flush=True)
            key = f"{case}_b{batch}"
            out.update({f"tps_{key}": ours_tps, f"hf_tps_{key}": hf_tps, f"ratio_{key}": ours_tps / hf_tps,
                        f"floor_{key}": floor})
            if batch == 1:
                out[f"ratio_{case}"] = ours_tps / hf_tps
            print(figures(out), flush=True)  # so far: a run stopped at a time limit keeps them
        ids, pixels = prompts(plain, 1, FLAGS.prefill_text)
        for _ in range(2):  # compiles, then runs once more
            prefill_ours(runner, ids, pixels)
        run_hf(hf, ids, pixels, 2)
        ours_s = min(prefill_ours(runner, ids, pixels) for _ in range(FLAGS.repeats))
        hf_s = min(run_hf(hf, ids, pixels, 2)[2] for _ in range(FLAGS.repeats))
        del hf, runner
        gc.collect()
        devices.release(device)
        safe = Runner(with_verdict(ours, config), max_length=config.text.max_position_embeddings, eos_id=-1,
                      pad_id=0)
        safe_ids, _ = prompts(config, 1, FLAGS.prefill_text)
        for _ in range(2):
            prefill_ours(safe, safe_ids, pixels, use_safety=True)
        verdict_s = min(prefill_ours(safe, safe_ids, pixels, use_safety=True) for _ in range(FLAGS.repeats))
        prefills.append((case, config.param_dtype, len(ids[0]), ours_s, len(safe_ids[0]), verdict_s, hf_s))
        out.update({f"ratio_prefill_{case}": hf_s / ours_s, f"ratio_prefill_verdict_{case}": hf_s / verdict_s,
                    f"prefill_s_{case}": ours_s, f"prefill_verdict_s_{case}": verdict_s,
                    f"hf_prefill_s_{case}": hf_s})
        print(figures(out), flush=True)
        del ours, safe
        gc.collect()
    print(f"{FLAGS.floor} bandwidth measured at {rate / 1e9:.1f} GB/s; 'of floor' = (weight bytes / that "
          f"rate) / our time per decode step; torch on {device}, JAX on {jax.devices()[0].device_kind}")
    print(f"{'case':<10} {'params':>7} {'dtype':>9} {'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} "
          f"{'ratio':>6} {'same ids':>8} {'of floor':>8}")
    for case, params, dtype, batch, o, h, r, same, floor in rows:
        print(f"{case:<10} {params:>7} {dtype:>9} {batch:>5} {o:>11.1f} {h:>9.1f} {r:>6.2f} {str(same):>8} "
              f"{floor:>8.0%}")
    print(f"\n{'prefill':<10} {'dtype':>9} {'tokens':>6} {'ours s':>7} {'+verdict':>8} {'tokens':>6} "
          f"{'HF s':>7} {'ratio':>6} {'verdict':>7}  (batch 1, pixels to first token; ratio: HF / ours)")
    for case, dtype, tokens, o, safe_tokens, v, h in prefills:
        print(f"{case:<10} {dtype:>9} {tokens:>6} {o:>7.3f} {v:>8.3f} {safe_tokens:>6} {h:>7.3f} {h / o:>6.2f} "
              f"{h / v:>7.2f}")
    print(figures(out))


if __name__ == "__main__":
    app.run(main)
