"""Hostile input against `python -m safevlm_jax.serve`: /health latency, memory, and errors.

    python benchmarks/serve_hostile.py [--rounds 3] [--clients 4] [--drain_timeout_s 5]

Starts the server on the shipped demo model (default limits: 20 MB bodies, 25 M pixels) on
127.0.0.1 as a subprocess and measures, in this order:
  1. per-image peak RSS: one request at a time on the quiet server for each large image
     (25 M pixels, RGBA; strips at the aspect limit; a 4800 x 4800 RGB), its peak RSS above
     the RSS before it (VmHWM after a reset through /proc/PID/clear_refs);
  2. the hostile run: --clients streaming clients asking a greedy question again and again,
     a /health poller (every 20 ms), and --rounds of every hostile request (values beyond
     their bounds, integers too long to parse, lone surrogates, a 19 MB prompt, a 19 MB body
     of separators, the large images, EPS/SVG/PDF labelled image/png, bombs, a strip beyond
     the aspect limit), four at a time;
  3. memory return: RSS after warm-up (before 1), at its peak, and once the server is idle
     again (after 2);
  4. SIGTERM with the clients still streaming: seconds until the process exits.
Errors: server_errors (any 5xx), unanswered (a request without its whole answer, or one not
answered within --request_timeout_s), failed_by_another (a steady client's answer that is not
its answer alone). Last line: key=value of each figure. Exits 1 if a goal is missed: 0 errors,
health p99 <= 200 ms, per-image peak <= 300 MB, RSS back within 300 MB of warm-up, exit
within the drain timeout (+ 5 s for uvicorn's grace and the interpreter's exit).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import zlib

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("rounds", 3, "times the hostile list is sent")
flags.DEFINE_integer("clients", 4, "steady streaming clients during the hostile run")
flags.DEFINE_float("drain_timeout_s", 5.0, "the server's --drain_timeout_s")
flags.DEFINE_float("request_timeout_s", 120.0, "a request not answered by then counts as unanswered")
FLAGS = flags.FLAGS
QUESTION = "What is shown in this image?"


def png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def large_images() -> dict[str, str]:
    """Compressible (small files), costly to decode: each close to 25 M pixels."""
    from PIL import Image

    from safevlm_jax.data.images import MAX_ASPECT

    short = int((25_000_000 / MAX_ASPECT) ** 0.5)
    gradient = Image.linear_gradient("L")
    return {"5000x5000 RGBA": png_url(gradient.resize((5000, 5000)).convert("RGBA")),
            f"{short * MAX_ASPECT}x{short} RGBA": png_url(gradient.resize((short * MAX_ASPECT, short)).convert("RGBA")),
            f"{short}x{short * MAX_ASPECT} RGB": png_url(gradient.resize((short, short * MAX_ASPECT)).convert("RGB")),
            "4800x4800 RGB": png_url(gradient.resize((4800, 4800)).convert("RGB"))}


def chat(image: str | None = None, question: str = QUESTION, **kw) -> dict:
    content = [{"type": "text", "text": question}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0, **kw}


def raw(fields: str) -> bytes:
    return ('{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, ' + fields + "}").encode()


def hostile_list(images: dict[str, str]) -> list[tuple[str, object]]:
    from PIL import Image

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EOF\n"
    bomb = io.BytesIO()
    Image.new("RGB", (8, 8)).save(bomb, format="PNG")
    bomb = bytearray(bomb.getvalue())
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR claims 100 000 x 100 000
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")
    url = lambda data: "data:image/png;base64," + base64.b64encode(bytes(data)).decode()
    cases = [("top_k 2^31+1", chat(top_k=2**31 + 1)), ("top_k vocab+1", chat(top_k=1025)),
             ("seed 2^64", chat(seed=2**64)), ("max_tokens 2^40", chat(max_tokens=2**40)),
             ("int of 5000 digits", raw('"seed": ' + "9" * 5000)), ("lone surrogate", raw('"user": "\\ud800"')),
             ("19 MB prompt", chat(question="lorem ipsum " * (19 * 2**20 // 12))),
             ("19 MB of separators", raw('"user": [' + "0," * (19 * 2**20 // 2) + "0]")),
             ("EPS as image/png", chat(url(eps))), ("SVG", chat(url(b'<svg xmlns="http://www.w3.org/2000/svg"/>'))),
             ("PDF", chat(url(b"%PDF-1.7\n%%EOF\n"))), ("bomb", chat(url(bomb))),
             ("strip beyond the aspect limit", chat(png_url(Image.new("RGB", (30_000, 100)))))]
    return cases + [(name, chat(image)) for name, image in images.items()]


def status(pid: int, key: str) -> float:
    """VmRSS / VmHWM of the process, MB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))


def start_server() -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "safevlm_jax.serve", "--port", "0", "--max_queue", "256",
           "--drain_timeout_s", str(FLAGS.drain_timeout_s)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("serving "):
            threading.Thread(target=lambda: [sys.stderr.write(x) for x in proc.stderr], daemon=True).start()
            return proc, line.split()[1]
        sys.stderr.write(line)
    raise RuntimeError(f"the server exited ({proc.wait()}) before it was ready")


class Tally:
    def __init__(self):
        self.lock, self.server_errors, self.unanswered, self.failed_by_another = threading.Lock(), 0, 0, 0
        self.answers = 0

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def send(client: httpx.Client, url: str, body, tally: Tally) -> int | None:
    try:
        if isinstance(body, bytes):
            r = client.post(f"{url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        else:
            r = client.post(f"{url}/v1/chat/completions", json=body)
    except httpx.HTTPError:
        tally.add(unanswered=1)
        return None
    tally.add(answers=1, server_errors=int(r.status_code >= 500))
    return r.status_code


def stream(client: httpx.Client, url: str, body: dict, tally: Tally) -> str | None:
    """A streamed answer's text, or None (counted) if it was not whole."""
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    except httpx.HTTPError:
        tally.add(unanswered=1)
        return None
    tally.add(answers=1, server_errors=int(r.status_code >= 500))
    if r.status_code != 200 or not lines or lines[-1] != "data: [DONE]":
        tally.add(unanswered=int(r.status_code == 200))
        return None
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def image_peaks(pid: int, url: str, images: dict[str, str], tally: Tally) -> dict[str, float]:
    peaks = {}
    with httpx.Client(timeout=FLAGS.request_timeout_s) as client:
        for name, image in images.items():
            before = status(pid, "VmRSS")
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            code = send(client, url, chat(image), tally)
            peaks[name] = status(pid, "VmHWM") - before
            print(f"  {name}: {code}, peak +{peaks[name]:.0f} MB", file=sys.stderr)
    return peaks


def hostile_run(pid: int, url: str, cases, example: str, want: str, tally: Tally) -> tuple[list[float], float, dict]:
    """The hostile list --rounds times (4 at a time) beside the steady clients and the poller:
    (/health latencies, peak RSS MB, status counts of the hostile requests)."""
    done, latencies, peak, codes = threading.Event(), [], [status(pid, "VmRSS")], {}

    def steady():
        with httpx.Client(timeout=FLAGS.request_timeout_s) as client:
            while not done.is_set():
                text = stream(client, url, chat(example), tally)
                tally.add(failed_by_another=int(text is not None and text != want))

    def poll():
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                start = time.perf_counter()
                try:
                    ok = client.get(f"{url}/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - start if ok else float("inf"))
                peak.append(status(pid, "VmRSS"))
                time.sleep(0.02)

    def attacker(share):
        with httpx.Client(timeout=FLAGS.request_timeout_s) as client:
            for name, body in share:
                code = send(client, url, body, tally)
                with tally.lock:
                    codes[code] = codes.get(code, 0) + 1

    workers = [threading.Thread(target=steady) for _ in range(FLAGS.clients)] + [threading.Thread(target=poll)]
    jobs = cases * FLAGS.rounds
    attackers = [threading.Thread(target=attacker, args=(jobs[i::4],)) for i in range(4)]
    for t in workers + attackers:
        t.start()
    for t in attackers:
        t.join()
    done.set()
    for t in workers:
        t.join()
    return latencies, max(peak), codes


def sigterm_while_streaming(proc: subprocess.Popen, url: str, example: str) -> float:
    """Seconds from SIGTERM to the exit, with --clients streams in flight."""
    def one():
        with httpx.Client(timeout=60) as client:
            stream(client, url, chat(example), Tally())

    streams = [threading.Thread(target=one, daemon=True) for _ in range(FLAGS.clients)]
    for t in streams:
        t.start()
    time.sleep(0.3)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=FLAGS.drain_timeout_s + 60)
    return time.monotonic() - signalled


def main(argv) -> None:
    del argv
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from safevlm_jax.checkpoint.demo import DEMO_DIR

    with open(os.path.join(DEMO_DIR, "examples", "clean.png"), "rb") as f:
        example = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    images = large_images()
    cases = hostile_list(images)
    load = os.getloadavg()
    proc, url = start_server()
    tally = Tally()
    try:
        with httpx.Client(timeout=60) as client:
            want = stream(client, url, chat(example), tally)
            for _ in range(3):
                stream(client, url, chat(example), tally)
        time.sleep(1)
        rss_warm = status(proc.pid, "VmRSS")
        print(f"warm: {rss_warm:.0f} MB; per-image peaks:", file=sys.stderr)
        peaks = image_peaks(proc.pid, url, images, tally)
        print("hostile run ...", file=sys.stderr)
        latencies, rss_peak, codes = hostile_run(proc.pid, url, cases, example, want, tally)
        time.sleep(2)
        rss_after = status(proc.pid, "VmRSS")
        exit_s = sigterm_while_streaming(proc, url, example)
    finally:
        if proc.poll() is None:
            proc.kill()
    finite = np.array([x for x in latencies if x != float("inf")]) * 1000
    p50, p99, worst = np.percentile(finite, 50), np.percentile(finite, 99), finite.max()
    health_failed = sum(x == float("inf") for x in latencies)
    rows = [("load average (1, 5, 15 min) at start", " ".join(f"{x:.1f}" for x in load)),
            ("/health polls during the hostile run", f"{len(latencies)} ({health_failed} failed)"),
            ("/health latency p50 / p99 / max", f"{p50:.1f} / {p99:.1f} / {worst:.1f} ms"),
            ("RSS after warm-up / peak / after the run", f"{rss_warm:.0f} / {rss_peak:.0f} / {rss_after:.0f} MB"),
            *((f"peak RSS added by one image: {name}", f"{mb:.0f} MB") for name, mb in peaks.items()),
            ("hostile requests: status counts", json.dumps({str(k): v for k, v in sorted(codes.items(), key=str)})),
            ("answers / server errors / unanswered / failed by another",
             f"{tally.answers} / {tally.server_errors} / {tally.unanswered} / {tally.failed_by_another}"),
            (f"SIGTERM to exit (drain timeout {FLAGS.drain_timeout_s:g} s)", f"{exit_s:.1f} s (status {proc.returncode})")]
    width = max(len(k) for k, _ in rows)
    print(f"| {'measure':<{width}} | value |\n|{'-' * (width + 2)}|---|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v} |")
    image_peak = max(peaks.values())
    figures = {"health_p50_ms": p50, "health_p99_ms": p99, "health_max_ms": worst, "rss_warm_mb": rss_warm,
               "rss_peak_mb": rss_peak, "rss_after_mb": rss_after, "rss_after_minus_warm_mb": rss_after - rss_warm,
               "image_peak_mb": image_peak, "server_errors": tally.server_errors, "unanswered": tally.unanswered + health_failed,
               "failed_by_another": tally.failed_by_another, "sigterm_exit_s": exit_s, "load1": load[0]}
    print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    missed = (tally.server_errors or tally.unanswered or health_failed or tally.failed_by_another or p99 > 200
              or image_peak > 300 or rss_after - rss_warm > 300 or exit_s > FLAGS.drain_timeout_s + 5
              or proc.returncode != 0)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    app.run(main)
