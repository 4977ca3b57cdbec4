"""Commands print what the request asked for and nothing else, also where PyTorch is not
installed (a plain `pip install -e .`): transformers' import-time notice that PyTorch is missing
never shows. The test environment has PyTorch (the parity tests need it), so each command runs
with `torch` hidden from imports: `sys.modules["torch"] = None`, which transformers' own check
(`importlib.util.find_spec`) reads as not installed."""

import os
import subprocess
import sys

from safevlm_jax.checkpoint.demo import DEMO_DIR

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
    assert verdict.startswith("risk: level 3") and answer.strip().startswith("I'm sorry"), stdout
    (stdout, stderr), code = out["import_hf"]
    assert (code, stdout) == (2, "") and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
