"""LLaVA-1.5-7B shapes end to end on this host: import, sample, export, bit-for-bit round trip.

    python benchmarks/scale_7b.py                 # the real 7B: ~14 GB of fp16, ~45 GB of disk, ~18 GB RAM
    python benchmarks/scale_7b.py --layers 2 --max_shard_size 500MB    # same widths, 2 LLM layers

Writes a random HF LLaVA directory with the published `llava-hf/llava-1.5-7b-hf` config.json
(`benchmarks/llava-1.5-7b-hf/`, `--layers` overriding only the LLM's depth): fp16 tensors under
the published key names (`language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`) in `--max_shard_size` shards plus
the index, the real LLaMA tokenizer of `tests/data/llama_tokenizer` with `<image>` = 32000 and
`<pad>` = 32001 added as llava-hf does, and its preprocessor config. Weights are uniform with
std 0.02 (norm scales 1 ± that), so every tensor's bytes differ.

Then runs, each in a fresh process whose peak RSS `/usr/bin/time` reports, as a user would:
  1. `python -m checkpoints_tools.import_hf --dtype bfloat16` (goal: peak RSS - the baseline
     <= 2x the largest shard; the baseline is an interpreter that imported the converter and
     started JAX's CPU client);
  2. `python -m safevlm_jax.sample --safety off --max_new_tokens 8` on it, twice in one process
     (`--batch_file`, one request per batch): the first call compiles, the second is timed
     against floors measured here: image encode and prefill at FLOPs / GEMM peak (a bf16
     matmul with f32 accumulation, as the model's dots), decode at the bytes one step reads /
     memory read bandwidth (goal: peak RSS <= 1.3x the weights); the bf16 checkpoint is deleted;
  3. `import_hf` keeping fp16, then `python -m checkpoints_tools.export_hf`, and every tensor of
     the export compared byte for byte (and by dtype and shape) with the source.
Everything lives in one temporary directory under `--workdir`, removed at the end, also on
failure. Prints a table, then one `key=value` line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from safevlm_jax import cli  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_integer("layers", None, "LLM layers (default: the published 32)", flag_values=FLAGS)
flags.DEFINE_string("max_shard_size", "5GB", "source shard limit (HF units)", flag_values=FLAGS)
flags.DEFINE_string("workdir", "/tmp", "where the temporary files go", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the random weights", flag_values=FLAGS)
flags.DEFINE_string("prompt", "Describe this image in detail.", "the question sampled about the image",
                    flag_values=FLAGS)

PUBLISHED = os.path.join(HERE, "llava-1.5-7b-hf")  # config.json, preprocessor_config.json
TOKENIZER = os.path.join(ROOT, "tests", "data", "llama_tokenizer")  # committed with the tests
# transformers 5's in-memory names -> the names of llava-hf's published files
PUBLISHED_PREFIXES = (("model.vision_tower.", "vision_tower.vision_model."),
                      ("model.multi_modal_projector.", "multi_modal_projector."),
                      ("model.language_model.", "language_model.model."),
                      ("lm_head.", "language_model.lm_head."))
NORM_NAMES = ("layernorm", "layer_norm", "layrnorm", ".norm.")
GB, GIB = 10**9, 2**30
MIN_FREE_RAM_FULL = 20 * GIB  # the full run peaks at ~18 GB: refuse to start below this


# The source directory -------------------------------------------------------------------------
def published_config(layers: int | None) -> dict:
    with open(os.path.join(PUBLISHED, "config.json")) as f:
        config = json.load(f)
    if layers is not None:
        config["text_config"]["num_hidden_layers"] = layers
    return config


def published_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(published key, shape) of every tensor of `LlavaForConditionalGeneration(config)`, in
    the files' order (language model, projector, vision tower), from a meta-device model."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**config))
    out = []
    for key, t in model.state_dict().items():
        old, new = next(p for p in PUBLISHED_PREFIXES if key.startswith(p[0]))
        out.append((new + key[len(old):], tuple(t.shape)))
    order = ("language_model.", "multi_modal_projector.", "vision_tower.")
    return sorted(out, key=lambda kv: next(i for i, p in enumerate(order) if kv[0].startswith(p)))


def random_tensor(rng: np.random.Generator, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """fp16, uniform with std 0.02 (norm scales: 1 + that)."""
    half = 0.02 * 3**0.5
    x = rng.random(shape, dtype=np.float32)
    x *= 2 * half
    x -= half
    if key.endswith(".weight") and any(n in key for n in NORM_NAMES):
        x += 1
    return x.astype(np.float16)


def write_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...]]], rng) -> None:
    """One fp16 safetensors file, its header written first and then one tensor at a time
    (never the whole shard in memory)."""
    header, offset = {}, 0
    for key, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, shape in tensors:
            f.write(memoryview(random_tensor(rng, key, shape)).cast("B"))


def write_tokenizer(out: str) -> None:
    """The real LLaMA tokenizer with llava-hf's two added tokens, saved into `out`."""
    import transformers

    if not os.path.isfile(os.path.join(TOKENIZER, "tokenizer.model")):
        raise FileNotFoundError(f"{TOKENIZER}/tokenizer.model is missing: it is the real LLaMA "
                                f"tokenizer committed with the tests (tests/data/llama_tokenizer/README.md)")
    tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    tok.add_tokens([transformers.AddedToken("<image>", special=True, normalized=False)],
                   special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    ids = tok.convert_tokens_to_ids(["<image>", "<pad>"])
    if ids != [32000, 32001]:
        raise RuntimeError(f"<image>, <pad> got ids {ids}, expected llava-hf's [32000, 32001]")
    tok.save_pretrained(out)


def write_source(out: str, layers: int | None, max_shard_bytes: int, seed: int) -> list[int]:
    """The random HF LLaVA directory; returns its shard sizes in bytes."""
    os.makedirs(out)
    config = published_config(layers)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copy(os.path.join(PUBLISHED, "preprocessor_config.json"), out)
    write_tokenizer(out)
    shards, size = [[]], 0
    for key, shape in published_tensors(copy.deepcopy(config)):
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > max_shard_bytes:  # HF's rule: a new file past the limit
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    rng = np.random.default_rng(seed)
    total = 0
    for name, tensors in zip(names, shards):
        write_safetensors(os.path.join(out, name), tensors, rng)
        total += sum(int(np.prod(s)) * 2 for _, s in tensors)
    index = {"metadata": {"total_size": total},
             "weight_map": {k: n for n, t in zip(names, shards) for k, _ in t}}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return [os.path.getsize(os.path.join(out, n)) for n in names]


def write_image(path: str) -> None:
    """A 400 x 300 RGB photo-like gradient with noise (resized and cropped by the processor)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:300, 0:400]
    rgb = np.stack([x / 400 * 255, y / 300 * 255, (x + y) / 700 * 255], -1)
    rgb = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)


# Running the commands -------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    wall_s: float
    peak_rss: int  # bytes
    stdout: str


def run(args: list[str], what: str) -> Run:
    """Runs `python args...` from the repo root on the CPU under `/usr/bin/time`; its wall time
    and peak RSS. (Not wait4 from here: a child inherits the peak RSS of the process it was
    forked from, this one with its libraries loaded.) Raises with its stderr's tail if it fails."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    with tempfile.NamedTemporaryFile("r") as usage, tempfile.TemporaryFile("w+") as out, \
            tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", usage.name, sys.executable, *args],
                              cwd=ROOT, env=env, stdout=out, stderr=err)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
        peak_kib = int(usage.read().split()[-1])
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(args)}\n{stderr[-3000:]}")
    print(f"  {what}: {wall:.1f} s, peak RSS {peak_kib / 2**20:.2f} GiB", flush=True)
    return Run(wall, peak_kib * 1024, stdout)


BASELINE = "import jax, checkpoints_tools.import_hf, checkpoints_tools.export_hf; jax.devices()"


def compare(source: str, exported: str) -> tuple[int, list[str]]:
    """(tensors compared, differences) between two HF directories, tensor by tensor: the same
    keys, and for each the same dtype, shape and bytes."""
    from checkpoints_tools.safetensors_io import SafetensorsDir

    a, b = SafetensorsDir(source), SafetensorsDir(exported)
    diffs = [f"only in the source: {k}" for k in sorted(set(a.shapes) - set(b.shapes))]
    diffs += [f"only in the export: {k}" for k in sorted(set(b.shapes) - set(a.shapes))]
    n = 0
    for key in sorted(set(a.shapes) & set(b.shapes)):
        x, y = a.tensor(key), b.tensor(key)
        n += 1
        if a.dtypes[key] != b.dtypes[key] or x.shape != y.shape:
            diffs.append(f"{key}: {a.dtypes[key]}{list(x.shape)} vs {b.dtypes[key]}{list(y.shape)}")
        elif x.tobytes() != y.tobytes():
            diffs.append(f"{key}: bytes differ")
    return n, diffs


# Floors ---------------------------------------------------------------------------------------
def floors(checkpoint: str, prompt_len: int, bandwidth_gib: float = 1.0) -> dict[str, float]:
    """Seconds each phase needs at least on this host, and the rates they come from.

    encode: the vision tower's and projector's FLOPs (2 per weight per patch token, plus the
    attention products) / GEMM peak; prefill: the LLM's FLOPs over the `prompt_len` real
    prompt tokens (the LM head on the last one; the sampler computes the padded length bucket)
    plus causal attention / GEMM peak; decode: bytes one step reads (every LLM weight but the
    embedding table, of which one row is gathered) / read bandwidth."""
    import jax.numpy as jnp

    sys.path.insert(0, HERE)
    from sample_vs_hf import bandwidth
    from train_step_vs_torch import matmul_peak

    from safevlm_jax.checkpoint.format import load_config
    from safevlm_jax.checkpoint.io import ParamReader

    config, reader = load_config(checkpoint), ParamReader(checkpoint)
    nbytes = {k: int(np.prod(s)) * reader.dtypes[k].itemsize for k, s in reader.shapes.items()}
    count = {k: int(np.prod(s)) for k, s in reader.shapes.items()}
    lm = {k for k in count if k.startswith("language_model/")}
    embed = {k for k in lm if "embed_tokens" in k}
    head = {k for k in lm if "lm_head" in k}
    t, v = config.text, config.vision
    patches = (v.image_size // v.patch_size) ** 2 + 1
    vision = sum(count[k] for k in count if k.startswith(("vision_tower/", "multi_modal_projector/")))
    encode_flops = 2 * vision * patches + 4 * v.num_hidden_layers * patches**2 * v.hidden_size
    body = sum(count[k] for k in lm - embed - head)
    prefill_flops = (2 * body * prompt_len + 2 * sum(count[k] for k in head)
                     + 2 * t.num_hidden_layers * prompt_len**2 * t.num_attention_heads * t.head_dim)
    decode_bytes = sum(nbytes[k] for k in lm - embed)
    peak, rate = matmul_peak(jnp.bfloat16), bandwidth("read", bandwidth_gib)
    return {"weights_bytes": sum(nbytes.values()), "decode_bytes": decode_bytes,
            "gemm_flops": peak, "bandwidth": rate,
            "encode_s": encode_flops / peak, "prefill_s": prefill_flops / peak,
            "decode_s": decode_bytes / rate}


# The benchmark --------------------------------------------------------------------------------
def main(argv) -> None:
    del argv
    from checkpoints_tools.safetensors_io import parse_size

    full = FLAGS.layers is None or FLAGS.layers == 32
    need_disk = 3.3 * 14.2 * GB * ((FLAGS.layers or 32) + 2) / 34  # source + checkpoint + export
    if shutil.disk_usage(FLAGS.workdir).free < need_disk:
        sys.exit(f"error: {FLAGS.workdir} has {shutil.disk_usage(FLAGS.workdir).free / GB:.0f} GB "
                 f"free; this run needs ~{need_disk / GB:.0f} GB")
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with open("/proc/meminfo") as f:
        meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    available = meminfo.get("MemAvailable", available)
    if full and available < MIN_FREE_RAM_FULL:
        sys.exit(f"error: {available / GIB:.1f} GiB of RAM available; the full 7B run needs "
                 f"{MIN_FREE_RAM_FULL / GIB:.0f} GiB (use --layers N for a reduced depth)")

    tmp = tempfile.mkdtemp(prefix="scale_7b-", dir=FLAGS.workdir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the ~45 GB
    try:
        rows = benchmark(tmp, FLAGS.layers, parse_size(FLAGS.max_shard_size), FLAGS.seed, FLAGS.prompt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows)


def benchmark(tmp: str, layers: int | None, max_shard: int, seed: int, prompt: str) -> dict:
    from safevlm_jax.inference.buckets import PROMPT_BUCKETS, bucket

    src, bf16, fp16, exported = (os.path.join(tmp, n) for n in ("hf", "ckpt_bf16", "ckpt_fp16", "export"))
    r: dict = {"layers": layers or 32}
    print(f"writing the random source in {src}", flush=True)
    start = time.perf_counter()
    shards = write_source(src, layers, max_shard, seed)
    r.update(source_s=time.perf_counter() - start, shards=len(shards), largest_shard=max(shards),
             source_bytes=sum(shards))
    r["baseline_rss"] = run(["-c", BASELINE], "baseline").peak_rss
    imp = run(["-m", "checkpoints_tools.import_hf", "--hf_dir", src, "--out", bf16,
               "--dtype", "bfloat16"], "import_hf --dtype bfloat16")
    r.update(import_bf16_s=imp.wall_s, import_bf16_rss=imp.peak_rss)

    image, batch = os.path.join(tmp, "image.png"), os.path.join(tmp, "requests.jsonl")
    write_image(image)
    with open(batch, "w") as f:  # twice: the first call compiles, the second is timed
        f.write((json.dumps({"image": image, "prompt": prompt}) + "\n") * 2)
    sample = run(["-m", "safevlm_jax.sample", "--checkpoint", bf16, "--batch_file", batch,
                  "--batch_size", "1", "--safety", "off", "--max_new_tokens", "8"], "sample")
    cold, warm = (json.loads(line) for line in sample.stdout.splitlines() if line.strip())
    r["same_tokens"] = cold["token_ids"] == warm["token_ids"]  # greedy: they must be
    r.update(sample_s=sample.wall_s, sample_rss=sample.peak_rss, cold=cold["timings"],
             warm=warm["timings"], new_tokens=len(warm["token_ids"]),
             prompt_len=len(warm["prompt_token_ids"]))
    r["prompt_bucket"] = bucket(r["prompt_len"], PROMPT_BUCKETS)
    r["floors"] = floors(bf16, r["prompt_len"])
    shutil.rmtree(bf16)

    imp = run(["-m", "checkpoints_tools.import_hf", "--hf_dir", src, "--out", fp16], "import_hf (fp16)")
    r.update(import_fp16_s=imp.wall_s, import_fp16_rss=imp.peak_rss)
    exp = run(["-m", "checkpoints_tools.export_hf", "--checkpoint", fp16, "--out", exported], "export_hf")
    r.update(export_s=exp.wall_s, export_rss=exp.peak_rss)
    shutil.rmtree(fp16)
    start = time.perf_counter()
    r["compared"], r["diffs"] = compare(src, exported)
    r["compare_s"] = time.perf_counter() - start
    return r


def report(r: dict) -> None:
    f, w, c = r["floors"], r["warm"], r["cold"]
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    import_over = {d: (r[f"import_{d}_rss"] - r["baseline_rss"]) / r["largest_shard"] for d in ("bf16", "fp16")}
    decode_per_token = w["decode_s"] / max(1, r["new_tokens"] - 1)
    rows = [
        ("LLM layers", f"{r['layers']}", ""),
        ("source (fp16)", f"{r['source_bytes'] / GB:.2f} GB in {r['shards']} shards, "
                          f"largest {r['largest_shard'] / GB:.2f} GB", f"written in {r['source_s']:.0f} s"),
        ("interpreter baseline RSS", gib(r["baseline_rss"]), ""),
        ("import_hf --dtype bfloat16", f"{r['import_bf16_s']:.0f} s, peak RSS {gib(r['import_bf16_rss'])}",
         f"{import_over['bf16']:.2f}x the largest shard above the baseline (goal <= 2)"),
        ("sample (process)", f"{r['sample_s']:.0f} s, peak RSS {gib(r['sample_rss'])}",
         f"{r['sample_rss'] / f['weights_bytes']:.2f}x the {f['weights_bytes'] / GB:.2f} GB of bf16 "
         f"weights (goal <= 1.3)"),
        ("  image encode", f"{w['encode_s']:.2f} s (first call {c['encode_s']:.1f} s)",
         f"floor {f['encode_s']:.2f} s: {f['encode_s'] / w['encode_s']:.0%} of it"),
        ("  prefill", f"{w['prefill_s']:.2f} s, {r['prompt_len']} tokens (bucket {r['prompt_bucket']}; "
                      f"first call {c['prefill_s']:.1f} s)",
         f"floor {f['prefill_s']:.2f} s: {f['prefill_s'] / w['prefill_s']:.0%}"),
        ("  greedy tokens", "the same in both calls" if r["same_tokens"] else "DIFFER between the calls", ""),
        ("  decode", f"{decode_per_token:.3f} s/token ({r['new_tokens']} tokens)",
         f"floor {f['decode_s']:.3f} s ({f['decode_bytes'] / GB:.2f} GB): "
         f"{f['decode_s'] / decode_per_token:.0%}"),
        ("  rates measured", f"GEMM {f['gemm_flops'] / 1e12:.2f} TFLOP/s (bf16, f32 acc.), "
                             f"read {f['bandwidth'] / GB:.1f} GB/s", ""),
        ("import_hf (fp16)", f"{r['import_fp16_s']:.0f} s, peak RSS {gib(r['import_fp16_rss'])}",
         f"{import_over['fp16']:.2f}x the largest shard above the baseline"),
        ("export_hf", f"{r['export_s']:.0f} s, peak RSS {gib(r['export_rss'])}", ""),
        ("round trip", f"{r['compared']} tensors compared in {r['compare_s']:.0f} s",
         "bit for bit" if not r["diffs"] else f"{len(r['diffs'])} differ: {r['diffs'][:5]}"),
    ]
    for name, value, note in rows:
        print(f"{name:28s} {value:58s} {note}")
    print(f"layers={r['layers']} largest_shard_gb={r['largest_shard'] / GB:.2f} "
          f"import_bf16_s={r['import_bf16_s']:.0f} "
          f"import_bf16_over_shard={import_over['bf16']:.2f} import_fp16_over_shard={import_over['fp16']:.2f} "
          f"sample_rss_over_weights={r['sample_rss'] / f['weights_bytes']:.2f} "
          f"encode_of_floor={f['encode_s'] / w['encode_s']:.2f} prefill_of_floor={f['prefill_s'] / w['prefill_s']:.2f} "
          f"decode_s_per_token={decode_per_token:.3f} decode_of_floor={f['decode_s'] / decode_per_token:.2f} "
          f"export_s={r['export_s']:.0f} export_rss_gib={r['export_rss'] / GIB:.2f} "
          f"round_trip_identical={int(not r['diffs'])} tensors={r['compared']} "
          f"same_greedy_tokens={int(r['same_tokens'])}")
    if r["diffs"] or not r["same_tokens"]:
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main, FLAGS)
