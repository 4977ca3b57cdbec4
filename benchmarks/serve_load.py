"""Load test of `python -m safevlm_jax.serve`: concurrent streaming clients vs one at a time.

    python benchmarks/serve_load.py [--config tiny|350m] [--levels 1,4,8,16] [--requests 4]

Writes a random checkpoint of the chosen config (safety modules on; `tiny` is the model
preset, `350m` the ~350M-parameter f32 LLaMA decoder of `sample_vs_hf.py`), starts the server
on 127.0.0.1 (a free port) as a subprocess and, for each concurrency c in --levels, runs c
clients that each send --requests streaming chat requests one after the other (an image and a
question, greedy, `max_tokens` = --max_tokens; random weights seldom emit EOS, so answers are
about that long). c = 1 is the baseline: sequential single requests through the same engine.
Per level: requests/s, generated tokens/s (from `usage`), p50/p99 latency, p50/p99 time to
first token (first answer text), p50/p99 gap between two text chunks of one stream (while the
other clients' new requests arrive and are prefilled), errors. A request still running at
--time_cap_s is an error. With --distinct_images every request sends an image of its own (no
verdict or prefix is reused); by default all send the same image and question, as a load test
of one popular prompt. Last line: `config=... decode_step_ms=... throughput_4_vs_1=...
throughput_8_vs_1=... gap_p99_over_p50_8=... errors=N` (a ratio is the level's tokens/s over
the c = 1 tokens/s; decode_step_ms is the engine's mean time of one decode step over all its
slots, from /health). Exits 1 if any request failed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_enum("config", "tiny", ["tiny", "350m"], "model config of the random checkpoint")
flags.DEFINE_list("levels", ["1", "4", "8", "16"], "concurrent clients per measured level")
flags.DEFINE_integer("requests", 4, "requests each client sends, one after the other")
flags.DEFINE_integer("max_tokens", 64, "max_tokens of every request")
flags.DEFINE_integer("slots", 8, "the server's --slots")
flags.DEFINE_integer("max_length", 512, "the server's --max_length (KV cache positions per slot)")
flags.DEFINE_integer("prefill_chunk", 64, "the server's --prefill_chunk (prompt tokens per decode step)")
flags.DEFINE_float("time_cap_s", 1500, "hard cap on the whole measurement (seconds)")
flags.DEFINE_string("workdir", None, "where the random checkpoint is kept (default: a temp dir)")
flags.DEFINE_bool("distinct_images", False, "every request an image of its own (nothing reused)")
FLAGS = flags.FLAGS
PROMPT = "What is shown in this image? Describe the picture."


def image_url(size: int, seed: int = 0) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start_server(checkpoint: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "safevlm_jax.serve", "--checkpoint", checkpoint, "--port", "0",
           "--slots", str(FLAGS.slots), "--max_queue", "256", "--max_length", str(FLAGS.max_length),
           "--prefill_chunk", str(FLAGS.prefill_chunk)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("serving "):
            return proc, line.split()[1]
        sys.stderr.write(line)
    raise RuntimeError(f"the server exited ({proc.wait()}) before it was ready")


async def one_request(client, url: str, body: dict) -> dict:
    """One streaming chat request -> {latency_s, ttft_s, tokens, gaps_s} (or raises); gaps_s:
    seconds between consecutive text chunks."""
    start, ttft, tokens, times = time.perf_counter(), None, None, []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
                ttft = ttft or times[-1] - start
    if tokens is None:
        raise RuntimeError("the stream ended without usage")
    return {"latency_s": time.perf_counter() - start, "ttft_s": ttft, "tokens": tokens,
            "gaps_s": np.diff(times).tolist()}


async def run_level(url: str, body, clients: int, requests: int, deadline: float) -> dict:
    """`body(n)`: the n-th request's body."""
    import httpx

    results, errors, sent = [], [], iter(range(10**9))

    async def client_loop(client):
        for _ in range(requests):
            try:
                results.append(await one_request(client, url, body(next(sent))))
            except Exception as e:  # counted, and shown once below
                errors.append(f"{type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        start = time.perf_counter()
        tasks = [asyncio.ensure_future(client_loop(client)) for _ in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - start
    lost = clients * requests - len(results) - len(errors)  # still running at the cap
    if lost:
        errors.append(f"{lost} request(s) unfinished at the time cap")
    latency = np.array([r["latency_s"] for r in results]) if results else np.zeros(1)
    ttft = np.array([r["ttft_s"] for r in results if r["ttft_s"] is not None] or [np.nan])
    tokens = sum(r["tokens"] for r in results)
    gaps = np.array([g for r in results for g in r["gaps_s"]] or [np.nan])
    return {"concurrency": clients, "requests": len(results), "wall_s": wall,
            "req_per_s": len(results) / wall, "tokens_per_s": tokens / wall,
            "p50_s": float(np.percentile(latency, 50)), "p99_s": float(np.percentile(latency, 99)),
            "ttft_p50_s": float(np.nanpercentile(ttft, 50)), "ttft_p99_s": float(np.nanpercentile(ttft, 99)),
            "gap_p50_s": float(np.nanpercentile(gaps, 50)), "gap_p99_s": float(np.nanpercentile(gaps, 99)),
            "errors": len(errors) - bool(lost) + lost, "first_error": errors[0] if errors else ""}


async def measure(url: str, levels: list[int], image_size: int) -> list[dict]:
    same = image_url(image_size)

    def body(n: int) -> dict:
        image = image_url(image_size, seed=n + 1) if FLAGS.distinct_images else same
        return {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": PROMPT}]}],
            "max_tokens": FLAGS.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}

    deadline = time.monotonic() + FLAGS.time_cap_s
    for clients in sorted({1, 2, 4, *levels}):  # warm-up: every verdict batch bucket compiles
        await run_level(url, body, clients, 1, deadline)
    rows = []
    for clients in levels:
        row = await run_level(url, body, clients, FLAGS.requests, deadline)
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                       if k != "first_error"), flush=True)
        if row["first_error"]:
            print(f"  first error: {row['first_error']}", flush=True)
    return rows


def main(argv) -> None:
    del argv
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    from benchmarks.random_models import write_checkpoint

    levels = [int(x) for x in FLAGS.levels]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(FLAGS.workdir or tmp, FLAGS.config)
        proc, url = start_server(checkpoint)
        try:
            from safevlm_jax.checkpoint.format import load_config

            rows = asyncio.run(measure(url, levels, load_config(checkpoint).vision.image_size))
            import httpx

            stats = httpx.get(f"{url}/health").json()  # the engine's own counters
        finally:
            proc.terminate()
            code = proc.wait(timeout=120)
    base = next((r["tokens_per_s"] for r in rows if r["concurrency"] == 1), None)
    errors = sum(r["errors"] for r in rows)
    ratios = " ".join(f"throughput_{r['concurrency']}_vs_1={r['tokens_per_s'] / base:.2f}"
                      for r in rows if base and r["concurrency"] != 1)
    gaps = " ".join(f"gap_p99_over_p50_{r['concurrency']}={r['gap_p99_s'] / r['gap_p50_s']:.2f}"
                    for r in rows if r["concurrency"] != 1)
    print(f"config={FLAGS.config} slots={FLAGS.slots} max_tokens={FLAGS.max_tokens} "
          f"prefill_chunk={FLAGS.prefill_chunk} "
          f"distinct_images={FLAGS.distinct_images} decode_step_ms={stats['decode_step_s'] * 1e3:.1f} "
          f"tokens_per_s_1={base:.1f} {ratios} {gaps} prefix_hits={stats['prefix_hits']} "
          f"verdict_cache_hits={stats['verdict_cache_hits']} errors={errors} server_exit={code}")
    sys.exit(1 if errors or code else 0)


if __name__ == "__main__":
    app.run(main)
