"""Nothing lost: a client that goes away frees its slot, a full queue answers 503, concurrent
requests each get one complete answer, SIGTERM drains the server and it exits 0."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from safevlm_jax.checkpoint.demo import random_checkpoint
from safevlm_jax.inference.pipeline import SafeVLMInference
from tests.serve_helpers import chat_body, example_url, live_engine, live_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = 300  # tokens; the random model's greedy answers do not stop earlier (asserted below)


def long_body(stream: bool) -> dict:
    extra = {"stream_options": {"include_usage": True}} if stream else {}
    return chat_body(example_url("clean"), max_tokens=LONG, stream=stream, model="random_tiny", **extra)


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory) -> str:
    """A tiny model with random weights: its greedy answers run to max_tokens, so a request
    holds its slot as long as the tests need."""
    return random_checkpoint(str(tmp_path_factory.mktemp("serve") / "random_tiny"))


@pytest.fixture(scope="module")
def one_slot(random_tiny):
    """A server whose engine has one slot and room for one waiting request."""
    inference = SafeVLMInference.from_checkpoint(random_tiny)
    with live_engine(inference, slots=1, max_queue=1) as engine, \
            live_server(engine, model_name="random_tiny") as s:
        yield s


def metric(server, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(f"{server.url}/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_for(condition, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_client_disconnecting_mid_stream_frees_its_slot(one_slot):
    tokens_before = one_slot.engine.stats().tokens_generated
    with httpx.stream("POST", f"{one_slot.url}/v1/chat/completions", json=long_body(True), timeout=60) as r:
        assert r.status_code == 200
        texts = []
        for line in r.iter_lines():  # read the verdict chunk and a few words, then hang up
            if '"delta": {"content"' in line:
                texts.append(line)
            if len(texts) == 3:
                break
    wait_for(lambda: metric(one_slot, 'safevlm_finish_reasons_total{reason="cancelled"}') == 1,
             what="the cancelled request")
    assert one_slot.engine.stats().active_slots == 0
    assert one_slot.engine.stats().tokens_generated - tokens_before < LONG  # it stopped early
    assert metric(one_slot, 'safevlm_requests_total{endpoint="chat",status="499"}') == 1
    # the freed slot serves the next request, to its end
    r = httpx.post(f"{one_slot.url}/v1/chat/completions", json=long_body(False), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == LONG


def test_client_leaving_before_a_plain_answer_frees_its_slot(one_slot):
    cancelled = 'safevlm_finish_reasons_total{reason="cancelled"}'
    before = metric(one_slot, cancelled)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the answer is generated
        httpx.post(f"{one_slot.url}/v1/chat/completions", json=long_body(False),
                   timeout=httpx.Timeout(30, read=0.3))
    wait_for(lambda: metric(one_slot, cancelled) == before + 1, what="the cancelled request")
    assert one_slot.engine.stats().active_slots == 0


def test_a_full_queue_answers_503_with_retry_after_and_nothing_is_lost(one_slot):
    results = [None] * 2

    def send(i):
        results[i] = httpx.post(f"{one_slot.url}/v1/chat/completions", json=long_body(False), timeout=120)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    threads[0].start()
    wait_for(lambda: one_slot.engine.stats().active_slots == 1, what="the first request in its slot")
    threads[1].start()
    wait_for(lambda: one_slot.engine.stats().queue_depth == 1, what="the second request queued")
    busy = httpx.post(f"{one_slot.url}/v1/chat/completions", json=long_body(False), timeout=60)
    assert busy.status_code == 503 and busy.headers["retry-after"].isdigit()
    assert busy.json()["error"]["code"] == "queue_full"
    for t in threads:
        t.join()
    for r in results[:2]:  # both accepted requests got their whole answer
        assert r.status_code == 200
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == LONG


def test_concurrent_requests_each_get_exactly_one_complete_answer(demo_api):
    server = demo_api
    names = ["clean", "low_risk", "medium_risk", "risky"] * 3
    answers = [None] * len(names)

    def send(i):
        stream = i % 2 == 1
        body = chat_body(example_url(names[i]), max_tokens=32, stream=stream)
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        answers[i] = (r.status_code, r.text)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = {n: httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(example_url(n), max_tokens=32),
                           timeout=120).json()["choices"][0]["message"]["content"] for n in set(names)}
    for i, (status, text) in enumerate(answers):
        assert status == 200
        if i % 2:  # streamed: one [DONE], one finish reason, the same text as alone (greedy)
            events = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
            assert text.count("data: [DONE]") == 1
            assert sum(1 for e in events if e["choices"][0]["finish_reason"]) == 1
            got = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        else:
            got = json.loads(text)["choices"][0]["message"]["content"]
        assert got == alone[names[i]], names[i]


@contextlib.contextmanager
def serving(env: dict, checkpoint: str, *flags: str):
    """`python -m safevlm_jax.serve` on a free port: (process, url), killed if still running."""
    proc = subprocess.Popen([sys.executable, "-m", "safevlm_jax.serve", "--checkpoint", checkpoint,
                             "--port", "0", *flags], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        said = []
        for line in proc.stderr:
            said.append(line)
            if line.startswith("serving "):
                break
        else:
            pytest.fail(f"the server exited with {proc.wait()} before serving:\n{''.join(said)}")
        yield proc, line.split()[1]
    finally:
        if proc.poll() is None:
            proc.kill()


def send_streams(url: str, bodies: list[dict]) -> tuple[list, list[threading.Thread]]:
    """Each body streamed on its own thread; results[i] = (status, non-empty lines)."""
    results = [None] * len(bodies)

    def send(i):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=bodies[i], timeout=120) as r:
            results[i] = (r.status_code, [line for line in r.iter_lines() if line])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return results, threads


def test_sigterm_stops_accepting_finishes_in_flight_requests_and_exits_0(random_tiny, cli_env):
    """Without warm-up the first request's programs compile when it comes up (seconds, more on
    a busy host): the other two are accepted meanwhile and wait for the one slot; the drain
    then also compiles the programs the others need, hence the long --drain_timeout_s."""
    with serving(cli_env, random_tiny, "--slots", "1", "--max_queue", "4", "--nowarmup",
                 "--drain_timeout_s", "300") as (proc, url), \
            httpx.Client(base_url=url, timeout=30) as client:
        assert url.startswith("http://127.0.0.1:")  # the default bind is loopback only
        health = lambda: client.get("/health").json()
        streams, threads = send_streams(url, [long_body(True)] * 3)
        # all three accepted, one or more waiting for the one slot: then SIGTERM
        wait_for(lambda: (h := health())["accepted"] == 3 and h["queue_depth"] >= 1,
                 what="three accepted requests, one still queued")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _refused(url), timeout=30, what="the listener to close")
        for t in threads:
            t.join(timeout=120)
        assert proc.wait(timeout=120) == 0
    for status, lines in streams:  # each whole: every token, one finish reason, [DONE]
        assert status == 200 and lines[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in lines[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]] == ["length"]
        assert chunks[-1]["usage"]["completion_tokens"] == LONG


def test_sigterm_cancels_what_outlasts_the_drain_timeout_and_exits_in_time(random_tiny, cli_env):
    """More work than --drain_timeout_s allows: what is unfinished at the deadline is
    cancelled, each client gets one answer (whole, or its error), and the process exits."""
    drain = 2.0
    with serving(cli_env, random_tiny, "--slots", "1", "--max_queue", "8", "--drain_timeout_s", str(drain),
                 "--nowarmup") as (proc, url), httpx.Client(base_url=url, timeout=30) as client:
        streams, threads = send_streams(url, [long_body(True)] * 6)  # ~6 x 300 tokens on one slot
        # and the first answering (no warm-up: its programs are compiled, not compiling at the deadline)
        wait_for(lambda: (h := client.get("/health").json())["accepted"] == 6 and h["tokens_generated"] > 0,
                 what="six accepted requests, the first answering")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        took = time.monotonic() - signalled
        for t in threads:
            t.join(timeout=60)
    assert took < drain + 8, took  # the deadline, uvicorn's grace and the interpreter's exit
    ends = []
    for status, lines in streams:  # one end each: a finish reason or the cancellation's error
        assert status == 200 and lines[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in lines[:-1]]
        end = [c["error"]["code"] if "error" in c else c["choices"][0]["finish_reason"]
               for c in chunks if "error" in c or (c["choices"] and c["choices"][0]["finish_reason"])]
        assert len(end) == 1, end
        ends += end
    assert "generation_cancelled" in ends and set(ends) <= {"generation_cancelled", "length"}, ends


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
        return False
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):  # refused, or reset in the backlog
        return True


def test_bad_flags_fail_with_one_error_line_and_status_2(tmp_path, cli_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runs = {what: subprocess.Popen([sys.executable, "-m", "safevlm_jax.serve", *args], cwd=ROOT, env=cli_env,
                                       stderr=subprocess.PIPE, text=True)
                for what, args in {f"cannot listen on 127.0.0.1:{port}": ["--port", str(port)],
                                   f"{tmp_path}: not a checkpoint": ["--port", "0", "--checkpoint", str(tmp_path)],
                                   "--slots=0": ["--slots", "0"]}.items()}
        for what, proc in runs.items():
            err = proc.communicate(timeout=120)[1]
            assert proc.returncode == 2, err
            assert err.count("\n") == 1 and err.startswith("error: ") and what in err, err


def test_warm_up_compiles_what_the_first_requests_need(tmp_path):
    """After `Engine.warm_up`, verdict batches of every size and a first chat (safety on and
    off) compile nothing. The model has a shape of its own, so no earlier test compiled for it."""
    import jax

    from configs.model import model_config

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    config = model_config("tiny")
    config = config.replace(vision=dataclasses.replace(config.vision, image_size=35))
    inference = SafeVLMInference.from_checkpoint(random_checkpoint(str(tmp_path / "ckpt"), config=config))
    with live_engine(inference, slots=3, max_queue=8, max_length=256) as engine, \
            live_server(engine, model_name="ckpt") as server:
        engine.warm_up()
        assert compiles  # the listener sees compilations
        before = len(compiles)
        image = {"type": "image_url", "image_url": {"url": example_url("clean")}}
        for n in (1, 2, 3):
            r = httpx.post(f"{server.url}/v1/moderations", json={"input": [image] * n}, timeout=60)
            assert r.status_code == 200 and len(r.json()["results"][0]["safety"]) == n
        for safety in (True, False):
            body = chat_body(example_url("clean"), question="What is shown?", max_tokens=3, model="ckpt",
                             safety=safety)
            assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        assert len(compiles) == before, compiles[before:]
