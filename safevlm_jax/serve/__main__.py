"""Serve SafeVLM over HTTP: OpenAI's chat and moderation API, metrics and a web demo.

    python -m safevlm_jax.serve [--checkpoint CKPT] [--host 127.0.0.1] [--port 8000]
                                [--slots 8] [--policy FILE] [--api_key KEY] [--mesh tensor=4]
                                [--served_model_name NAME,ALIAS] [--allowed_media_domains a.com,b.org]
                                [--cors_origins https://app.example] [--log_prompts]

Without --checkpoint it serves the shipped demo model (as `safevlm_jax.sample`). `--port 0`
takes a free port. Once warmed up (every program the engine can run compiled; --nowarmup
skips it) it prints `serving http://HOST:PORT` on stderr. SIGTERM or Ctrl-C: stop accepting,
finish every request in flight, exit 0; what is not finished `--drain_timeout_s` after the
signal is cancelled (each client gets its error) and the process exits all the same. Each
answer is one access-log line on stderr (`serve/access_log.py`).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from absl import flags

from safevlm_jax import cli
from safevlm_jax.safety.prompt import TEMPLATES

FLAGS = flags.FlagValues()  # the command's own (safevlm_jax.cli)
F = dict(flag_values=FLAGS)
flags.DEFINE_string("checkpoint", None, "checkpoint directory (default: the shipped demo)", **F)
flags.DEFINE_string("host", "127.0.0.1", "address to bind (0.0.0.0: reachable from the network)", **F)
flags.DEFINE_integer("port", 8000, "TCP port (0: any free port)", lower_bound=0, upper_bound=65535, **F)
flags.DEFINE_integer("slots", 8, "requests decoded together (KV cache rows)", lower_bound=1, **F)
flags.DEFINE_integer("max_length", 0, "KV cache positions per slot, the context (0: the model's)",
                     lower_bound=0, **F)
flags.DEFINE_integer("max_queue", 64, "requests that may wait for a slot (then 503)", lower_bound=1, **F)
flags.DEFINE_string("policy", None, "risk policy JSON/YAML file (safevlm_jax.safety.policy)", **F)
flags.DEFINE_string("hints", None, "JSON/YAML file replacing hint texts (safevlm_jax.safety.hints)", **F)
flags.DEFINE_enum("template", None, sorted(TEMPLATES),
                  "conversation template (default: the one the checkpoint records)", **F)
flags.DEFINE_string("api_key", None, "require 'Authorization: Bearer KEY' on /v1/* (default: open)", **F)
flags.DEFINE_list("served_model_name", None, "NAME[,ALIAS...]: the model id /v1/models reports, then other ids "
                  "requests may name (default: the checkpoint's folder)", **F)
flags.DEFINE_integer("max_tokens", 256, "max_tokens of requests that give none", lower_bound=1, **F)
flags.DEFINE_integer("max_body_mb", 20, "larger request bodies get 413", lower_bound=1, **F)
flags.DEFINE_integer("max_image_pixels", 25_000_000, "larger images are refused undecoded", lower_bound=1, **F)
flags.DEFINE_bool("warmup", True, "compile the first requests' programs before serving", **F)
flags.DEFINE_bool("allow_safety_off", True, "let requests send safety: false (the page's comparison)", **F)
flags.DEFINE_integer("prefill_chunk", 64, "most prompt tokens prefilled per decode step while others decode",
                     lower_bound=1, **F)
flags.DEFINE_integer("prefix_cache_mb", -1, "memory for recent prompts' keys and values, reused by requests "
                     "that start alike (-1: half the KV cache; 0: none)", lower_bound=-1, **F)
flags.DEFINE_enum("system_prompt", "allow", ["allow", "ignore", "refuse"],
                  "system/developer messages: replace the template's system text, are dropped, or get a 400", **F)
cli.define_mesh_flag(FLAGS)
flags.DEFINE_float("drain_timeout_s", 30.0, "after SIGTERM, finish requests for this long, then cancel the rest",
                   lower_bound=0, **F)
flags.DEFINE_list("allowed_media_domains", [], "hosts whose http(s) image URLs are fetched, exactly as named "
                  "(default: none; images come as data: URLs)", **F)
flags.DEFINE_bool("allow_private_media", False, "fetch image URLs that resolve to loopback or private addresses", **F)
flags.DEFINE_float("media_fetch_timeout_s", 5.0, "the longest an image URL's fetch may take", lower_bound=0.1, **F)
flags.DEFINE_list("cors_origins", [], "origins whose pages may call the API from a browser ('*': any)", **F)
flags.DEFINE_bool("log_prompts", False, "the access log also shows each chat prompt", **F)
flags.DEFINE_integer("input_workers", 4, "threads decoding request bodies and images, tokenizing prompts",
                     lower_bound=1, **F)


def build():
    """Checkpoint -> (started and warmed-up Engine, app, settings); ValueError for bad flags or files."""
    from safevlm_jax.checkpoint.demo import resolve_checkpoint
    from safevlm_jax.inference.engine import Engine
    from safevlm_jax.safety.hints import load_hints
    from safevlm_jax.safety.policy import load_policy
    from safevlm_jax.serve.app import ServeSettings, create_app
    from safevlm_jax.serve.fetch import FetchPolicy

    checkpoint = resolve_checkpoint(FLAGS.checkpoint)
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise ValueError(f"--checkpoint {checkpoint}: not a checkpoint directory (no config.json)")
    engine = Engine.from_checkpoint(
        checkpoint, template=FLAGS.template, hints=load_hints(FLAGS.hints) if FLAGS.hints else None,
        policy=load_policy(FLAGS.policy) if FLAGS.policy else None, mesh=cli.mesh_flag(FLAGS), slots=FLAGS.slots,
        max_queue=FLAGS.max_queue, max_length=FLAGS.max_length or None, prefill_chunk=FLAGS.prefill_chunk,
        prefix_cache_bytes=None if FLAGS.prefix_cache_mb < 0 else FLAGS.prefix_cache_mb << 20)
    names = [n.strip() for n in FLAGS.served_model_name or [] if n.strip()]
    if FLAGS.served_model_name is not None and not names:
        raise ValueError("--served_model_name: give at least one name")
    names = names or [os.path.basename(os.path.normpath(checkpoint))]
    settings = ServeSettings(
        model_name=names[0], model_aliases=tuple(names[1:]), api_key=FLAGS.api_key, max_body_bytes=FLAGS.max_body_mb * 2**20,
        max_image_pixels=FLAGS.max_image_pixels, default_max_tokens=FLAGS.max_tokens,
        allow_safety_off=FLAGS.allow_safety_off, input_workers=FLAGS.input_workers,
        media=FetchPolicy(tuple(d.strip().lower() for d in FLAGS.allowed_media_domains if d.strip()),
                          FLAGS.allow_private_media, FLAGS.media_fetch_timeout_s),
        cors_origins=tuple(FLAGS.cors_origins), log_prompts=FLAGS.log_prompts, system_prompt=FLAGS.system_prompt)
    engine.start()
    if FLAGS.warmup:
        engine.warm_up()
    return engine, create_app(engine, settings), settings


def bind(host: str, port: int) -> socket.socket:
    """A bound socket (here, so that --port 0 can report its port)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


def serve(application, sock: socket.socket, engine, drain_timeout_s: float, grace_s: float = 2.0) -> None:
    """uvicorn on `sock` until SIGTERM/SIGINT, with a deadline on the drain: `drain_timeout_s`
    after the first signal the engine cancels what it still holds (each waiting client gets
    its error, so the connections close) and uvicorn cancels a handler still running
    `grace_s` later; returns within about `drain_timeout_s` + `grace_s` of the signal."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(application, log_level="warning", access_log=False, timeout_keep_alive=5,
                                           timeout_graceful_shutdown=drain_timeout_s + grace_s))
    deadline = []

    def on_signal(sig, frame):
        if not deadline:
            deadline.append(time.monotonic() + drain_timeout_s)
            timer = threading.Timer(drain_timeout_s, engine.shutdown, kwargs={"drain": False, "timeout": 0})
            timer.daemon = True
            timer.start()
        uvicorn_exit(sig, frame)

    uvicorn_exit, server.handle_exit = server.handle_exit, on_signal  # what uvicorn installs
    try:
        server.run(sockets=[sock])
    finally:
        end = deadline[0] if deadline else time.monotonic() + drain_timeout_s
        engine.shutdown(drain=True, timeout=max(0.0, end - time.monotonic()))
        stats = engine.stats()
        if stats.running:  # past the deadline
            left = stats.accepted - sum(stats.finished.values())
            print(f"cancelling {left} request(s) still running {drain_timeout_s} s after the signal",
                  file=sys.stderr, flush=True)
            engine.shutdown(drain=False, timeout=grace_s)


def run(argv) -> None:
    """The command, after flag parsing (ValueError/OSError: one `error:` line, exit 2)."""
    del argv
    from safevlm_jax.serve import access_log, memory

    memory.keep_large_buffers_mapped()
    access_log.to_stderr()
    sock = bind(FLAGS.host, FLAGS.port)
    engine, application, _ = build()
    # uvicorn re-raises the signal that stopped it once it has drained; with these handlers
    # that re-raise returns here, so the engine drains too and the exit status is 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    sock.listen(2048)  # from here a connection waits in the backlog until uvicorn accepts it
    host, port = sock.getsockname()[:2]
    print(f"serving http://{host if ':' not in host else f'[{host}]'}:{port}", file=sys.stderr, flush=True)
    serve(application, sock, engine, FLAGS.drain_timeout_s)


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(run, FLAGS, argv)


if __name__ == "__main__":
    main()
