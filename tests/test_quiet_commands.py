"""Commands print what the request asked for and nothing else, also where PyTorch is not
installed (a plain `pip install -e .`): transformers' import-time notice that PyTorch is missing
never shows. The test environment has PyTorch (the parity tests need it), so each command runs
with `torch` hidden from imports: `sys.modules["torch"] = None`, which transformers' own check
(`importlib.util.find_spec`) reads as not installed."""

import os
import signal
import subprocess
import sys
import threading

import httpx

from safevlm_jax.checkpoint.demo import DEMO_DIR
from tests.serve_helpers import chat_body, example_url

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTICE = "PyTorch was not found"
# python -c HIDE_TORCH MODULE ARGS...: runs `python -m MODULE ARGS...` without torch
HIDE_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def without_torch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HIDE_TORCH, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_without_torch_commands_print_only_their_results_and_errors(tmp_path):
    runs = {
        # transformers alone, to show the notice exists where torch is hidden
        "transformers": subprocess.Popen([sys.executable, "-c", "import sys; sys.modules['torch'] = None; "
                                          "import transformers; print(transformers.is_torch_available())"],
                                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        "sample": without_torch("safevlm_jax.sample", "--image", f"{DEMO_DIR}/examples/risky.png",
                                "--prompt", "What is shown in this image?"),
        "import_hf": without_torch("checkpoints_tools.import_hf", f"--hf_dir={tmp_path / 'none'}",
                                   f"--out={tmp_path / 'ckpt'}"),
    }
    out = {name: (run.communicate(timeout=600), run.returncode) for name, run in runs.items()}
    (stdout, stderr), code = out["transformers"]
    assert (stdout, code) == ("False\n", 0) and NOTICE in stderr, stderr
    (stdout, stderr), code = out["sample"]
    assert (code, stderr) == (0, ""), stderr
    verdict, answer = stdout.splitlines()
    assert verdict.startswith("risk: level 3") and answer.startswith("I'm sorry"), stdout  # no leading space
    (stdout, stderr), code = out["import_hf"]
    assert (code, stdout) == (2, "") and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr


def test_without_torch_serve_prints_its_address_and_one_access_line_per_request():
    run = without_torch("safevlm_jax.serve", "--port=0", "--nowarmup", "--slots=1")
    killer = threading.Timer(600, run.kill)  # a server that never says where it listens
    killer.start()
    try:
        serving = run.stderr.readline()
        assert serving.startswith("serving http://127.0.0.1:"), serving + run.stderr.read()
        r = httpx.post(f"{serving.split()[1]}/v1/chat/completions", timeout=300,
                       json=chat_body(example_url("risky"), max_tokens=8))
        assert r.json()["choices"][0]["message"]["content"].startswith("I'm sorry")  # no leading space
        run.send_signal(signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        killer.cancel()
        run.kill()
    assert (run.returncode, stdout) == (0, ""), stderr
    [line] = stderr.splitlines()
    assert " 127.0.0.1 POST /v1/chat/completions 200 " in line and " tokens=" in line, stderr
    assert "What is shown" not in line  # no prompt text without --log_prompts
