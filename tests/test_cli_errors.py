"""Every command line fails alike on a bad input (`safevlm_jax.cli`): one line `error: ...` on
stderr naming the file or flag at fault, exit status 2, no traceback; a bug keeps its traceback.

Each CLI runs once as a process of its own (absl's app.run path), on inputs that fail before
any model is compiled: one `python` process imports JAX (most of a command's start-up) and
forks a child per command, which runs the module as `python -m` does (`runpy`, `__main__`)
with its own stdout, stderr and exit status."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from safevlm_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["sample", "serve", "scan", "train", "plan", "plan target", "data.build", "data.synthetic", "data.photos", "data.inspect",
         "eval.head", "eval.tsne", "eval.generate", "eval.report", "import_hf", "import_safety", "export_hf",
         "unknown flag", "stray argument"]


def cases(tmp) -> dict[str, tuple[list[str], str]]:
    """{name: (python -m arguments, text the error line must contain)}; writes the bad inputs."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp / "a.png")
    (tmp / "bad.json").write_text('[{"id": 1,')
    (tmp / "a_file").write_text("not a directory")
    (tmp / "hf").mkdir()
    save_file({"w": np.ones((64, 64), np.float32)}, str(tmp / "hf" / "model.safetensors"))
    with open(tmp / "hf" / "model.safetensors", "r+b") as f:  # a download cut short
        f.truncate(os.path.getsize(tmp / "hf" / "model.safetensors") // 2)
    none = str(tmp / "no_checkpoint")
    return {
        "sample": (["safevlm_jax.sample", f"--checkpoint={none}", f"--image={tmp / 'a.png'}", "--prompt=Hi"],
                   f"{none}: not a checkpoint"),
        "serve": (["safevlm_jax.serve", f"--checkpoint={none}", "--port=0"],
                  f"--checkpoint {none}: not a checkpoint directory"),
        "scan": (["safevlm_jax.scan", f"--checkpoint={none}", f"--images={tmp}", f"--out={tmp / 'scan'}",
                  "--batch_size=0"], "--batch_size=0"),
        "train": (["safevlm_jax.train", "--config=configs/stage1.py:tiny", f"--workdir={tmp / 'w'}",
                   "--config.optimizer.lrr=1"], "--config.optimizer.lrr: no such field"),
        "plan": (["safevlm_jax.plan", "--config=configs/stage2.py:tiny", "--mesh=fsdp=x"], "--mesh 'fsdp=x'"),
        "plan target": (["safevlm_jax.plan", "--config=configs/stage2.py:tiny", "--target=v5e-3"],
                        "--target 'v5e-3'"),
        "data.build": (["safevlm_jax.data.build", f"--json={tmp / 'bad.json'}", f"--image_root={tmp}",
                        f"--out={tmp / 'ds'}"], f"{tmp / 'bad.json'}: not valid JSON"),
        "data.synthetic": (["safevlm_jax.data.synthetic", f"--out={tmp / 'a_file' / 'syn'}", "--n=2"],
                           f"{tmp / 'a_file' / 'syn'}: Not a directory"),
        "data.inspect": (["safevlm_jax.data.inspect", f"--checkpoint={none}", f"--json={tmp / 'bad.json'}",
                          f"--image_root={tmp}"], f"{none}: not a checkpoint"),
        "data.photos": (["safevlm_jax.data.photos", f"--out={tmp / 'p'}", "--set=mine"], "--set=mine"),
        "eval.head": (["safevlm_jax.eval.head", f"--checkpoint={none}", f"--data={tmp}", f"--out={tmp / 'h'}"],
                      f"{none}: not a checkpoint directory"),
        "eval.tsne": (["safevlm_jax.eval.tsne", f"--data={tmp}", f"--out={tmp / 't'}", "--perplexity=high"],
                      "--perplexity=high"),
        "eval.generate": (["safevlm_jax.eval.generate", "--rescore", f"--out={tmp / 'none.jsonl'}"],
                          f"{tmp / 'none.jsonl'}: no such answers file"),
        "eval.report": (["safevlm_jax.eval.report", f"--runs={tmp / 'no_run'}", f"--out={tmp / 'r'}"],
                        f"{tmp / 'no_run'}: no such run directory"),
        "import_hf": (["checkpoints_tools.import_hf", f"--hf_dir={tmp / 'hf'}", f"--out={tmp / 'ck'}"],
                      f"{tmp / 'hf' / 'model.safetensors'}: not a readable safetensors file"),
        "import_safety": (["checkpoints_tools.import_safety", f"--src={tmp / 'a.bin'}", f"--checkpoint={none}",
                           f"--rename={tmp / 'bad.json'}"], f"--rename {tmp / 'bad.json'}: not valid JSON"),
        "export_hf": (["checkpoints_tools.export_hf", f"--checkpoint={none}", f"--out={tmp / 'x'}",
                       "--key_style=mine"], "--key_style=mine"),
        "unknown flag": (["safevlm_jax.eval.report", "--runs=a", "--out=b", "--colour=red"], "'colour'"),
        "stray argument": (["safevlm_jax.data.synthetic", f"--out={tmp / 's'}", "--n=2", "extra"], "'extra'"),
    }


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
# stdin: JSON [[out_dir, name, argv], ...] with argv ["-m", module, *args] or ["-c", code]. Up to
# 4 children at once; each writes name.out and name.err and ends as `python -m`/`-c` would
# (an uncaught exception: the interpreter's traceback and status 1); stdout: JSON {name: status}.
FORK_EACH = """
import json, os, runpy, sys
import jax, flax.nnx, safevlm_jax.checkpoint.format  # what most commands import: once, here
status, running = {}, {}
def reap():
    pid, code = os.wait()
    status[running.pop(pid)] = os.waitstatus_to_exitcode(code)
for out, name, argv in json.load(sys.stdin):
    while len(running) >= 4:
        reap()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        running[pid] = name
        continue
    for fd, ext in ((1, 'out'), (2, 'err')):
        os.dup2(os.open(os.path.join(out, name + '.' + ext), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = argv[:1] + argv[2:]
    if argv[0] == '-m':
        runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
    else:
        exec(compile(argv[1], '<string>', 'exec'), {'__name__': '__main__'})
    sys.exit(0)
while running:
    reap()
print(json.dumps(status))
"""


def run_each(runs: dict[str, list[str]], out) -> dict[str, subprocess.CompletedProcess]:
    """{name: python argv} -> {name: the finished process (returncode, stdout, stderr)}, each
    run as a child forked from one interpreter that has imported JAX (`FORK_EACH`)."""
    todo = json.dumps([[str(out), name, argv] for name, argv in runs.items()])
    parent = subprocess.run([sys.executable, "-c", FORK_EACH], input=todo, cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert parent.returncode == 0, parent.stderr
    status = json.loads(parent.stdout)
    read = lambda name, ext: (out / f"{name}.{ext}").read_text()
    return {name: subprocess.CompletedProcess(argv, status[name], read(name, "out"), read(name, "err"))
            for name, argv in runs.items()}


BUG = "from absl import flags; from safevlm_jax import cli; cli.run(lambda argv: {}['a bug'], flags.FlagValues())"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, str | None]]:
    """{name: (its process, the text its error line must contain)} for every case, and for a
    bug and a --help (no error line), each run as its own process."""
    todo = cases(tmp_path_factory.mktemp("cli"))
    assert sorted(todo) == sorted(NAMES)
    argvs = {name: ["-m", *args] for name, (args, _) in todo.items()}
    argvs |= {"bug": ["-c", BUG], "help": ["-m", "safevlm_jax.eval.report", "--help"]}
    done = run_each(argvs, tmp_path_factory.mktemp("out"))
    return {name: (done[name], todo[name][1] if name in todo else None) for name in argvs}


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_one_error_line_naming_it_and_exit_status_2(runs, name):
    proc, expected = runs[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: ") and expected in lines[-1], proc.stderr
    assert sum(line.startswith("error:") for line in lines) == 1


def test_a_bug_keeps_its_traceback_and_help_is_not_an_error(runs):
    (bug, _), (help_, _) = runs["bug"], runs["help"]
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'a bug'" in bug.stderr
    assert "error:" not in bug.stderr
    assert help_.returncode == 0 and "--runs" in help_.stdout and "--title" in help_.stdout


def test_message_is_one_line_and_an_oserror_names_its_file(tmp_path):
    try:
        open(tmp_path / "missing.json")
    except OSError as e:
        assert cli.message(e) == f"{tmp_path / 'missing.json'}: No such file or directory"
    assert cli.message(ValueError("a.json: bad\n  field x\n")) == "a.json: bad field x"


def test_in_process_call_parses_afresh_and_exits_2_on_bad_input(tmp_path, capsys):
    from absl import flags

    fv, seen = flags.FlagValues(), []
    flags.DEFINE_integer("n", 1, "n", flag_values=fv)
    flags.DEFINE_bool("v2", False, "v2", flag_values=fv)
    cli.run(lambda argv: seen.append((fv.n, fv.v2)), fv, ["--n=3", "--v2"])
    cli.run(lambda argv: seen.append((fv.n, fv.v2)), fv, [])  # defaults again, not the last call's
    assert seen == [(3, True), (1, False)]
    with pytest.raises(SystemExit) as e:
        cli.run(lambda argv: json.loads("{"), fv, [])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: Expecting property name")
    with pytest.raises(RuntimeError):  # a bug is not an expected error
        cli.run(lambda argv: (_ for _ in ()).throw(RuntimeError("bug")), fv, [])


def test_commands_skip_the_tpu_probe_only_where_no_accelerator_device_exists(monkeypatch):
    """libtpu is installed here (the test extra): a command on a machine without TPU or GPU
    device files starts on the CPU without probing; with JAX_PLATFORMS set, or a TPU VM's
    device files, it leaves JAX's choice alone."""
    import glob

    monkeypatch.setattr(glob, "glob", lambda pattern: [])
    assert not cli.skip_tpu_probe_without_tpu()  # JAX_PLATFORMS=cpu (conftest) decides
    monkeypatch.delenv("JAX_PLATFORMS")
    assert cli.skip_tpu_probe_without_tpu()
    monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/accel0"] if pattern == "/dev/accel*" else [])
    assert not cli.skip_tpu_probe_without_tpu()
