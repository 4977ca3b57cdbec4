"""One way for every command line to parse its flags and to fail.

Each `python -m ...` command of this project is written alike:

    from absl import flags
    from safevlm_jax import cli

    FLAGS = flags.FlagValues()  # the command's own: CLIs that share a flag name (--checkpoint,
                                # --out) can then be imported into one process (tests, libraries)
    flags.DEFINE_string("out", None, "output directory", required=True, flag_values=FLAGS)

    def _main(argv) -> None:   # argv: [program] (+ positional arguments if positional=True)
        if ...:
            raise ValueError(f"{FLAGS.out}: ... expected ...")   # a bad input: name it
        ...

    def main(argv=None) -> None:
        \"\"\"argv: the arguments after the program name (default: sys.argv[1:]).\"\"\"
        cli.run(_main, FLAGS, argv)

    if __name__ == "__main__":
        main()

How a command fails: a bad flag (unknown, a bad value, a required one missing) and every
exception of `EXPECTED` raised by the command -- `ValueError` (what the libraries raise for a
bad file, field, checkpoint or value, naming it and what was expected), `OSError` (a file that
is missing or unreadable), `UsageError` -- print one line `error: <message>` on stderr and
exit with status 2, without a traceback. Anything else is a bug and keeps its traceback
(status 1). With `--verbosity=1` (`-v 1`) an expected error prints its traceback too. Logs
below WARNING are shown only when --verbosity is given.

From the shell (`argv=None`) the command runs under `absl.app.run`, so absl's own flags work
(`--verbosity`, `--logtostderr`, `--flagfile`, `--only_check_args`, `--pdb_post_mortem`);
`--help` prints the module docstring and the command's flags. Given `argv` (tests, Python
callers) the same parsing and error lines apply in-process, and an error raises SystemExit(2).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import traceback
from typing import Any, Callable, Sequence

import jax
from absl import app, flags, logging


class UsageError(ValueError):
    """A command that cannot run as asked: flags that are each valid but do not make a command
    together (e.g. neither --image nor --batch_file), or an optional package it needs is not
    installed. A ValueError, so library code may raise it too."""


EXPECTED = (ValueError, OSError, app.UsageError, flags.Error)
HELP = ("-h", "-?", "-help", "--help", "-helpshort", "--helpshort", "-helpfull", "--helpfull")
EXIT_USAGE = 2


def message(error: BaseException) -> str:
    """The error as one line: an OSError as `path: reason`, line breaks folded to spaces."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        names = [str(error.filename)] + ([str(error.filename2)] if error.filename2 else [])
        text = f"{' -> '.join(names)}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def fail(error: BaseException, debug: bool = False) -> None:
    """Prints `error: <message>` (after the traceback if `debug`) and exits with status 2."""
    if debug:
        traceback.print_exception(error)
    sys.stdout.flush()
    print(f"error: {message(error)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def _usage(flag_values: flags.FlagValues, full: bool) -> None:
    """--help: the program's docstring and its flags (--helpfull: and absl's)."""
    doc = getattr(sys.modules.get("__main__"), "__doc__", None) or f"usage: {sys.argv[0]} [flags]\n"
    print(f"{doc.rstrip()}\n\nflags:\n{flag_values.get_help()}")
    if full:
        print(f"\nabsl flags:\n{flags.FLAGS.get_help()}")


def _with_absl_flags(flag_values: flags.FlagValues) -> None:
    """Adds absl's own flags (logging, --flagfile, --only_check_args...) to `flag_values`; the
    Flag objects are shared, so absl reads what `flag_values` parsed. Help is ours (`_usage`)."""
    for name, flag in flags.FLAGS._flags().items():  # pylint: disable=protected-access
        if name == flag.name and name not in flag_values and not name.startswith("help"):
            flag_values[name] = flag


def parse(flag_values: flags.FlagValues, args: Sequence[str], positional: bool = False) -> list[str]:
    """Parses `args` (program name first) into `flag_values` from scratch; returns the program
    name and the positional arguments. Raises flags.Error or UsageError with one-line messages."""
    flag_values.unparse_flags()  # a second call (in-process) must not inherit the first's values
    try:
        rest = flag_values(list(args))
    except (AttributeError, KeyError) as e:  # ml_collections: --config.FIELD=... of no such field
        raise _no_config_field(e, args) from e
    if len(rest) > 1 and not positional:
        raise UsageError(f"unexpected argument {rest[1]!r} (flags are --name=value; see --help)")
    return rest


def _no_config_field(error: Exception, args: Sequence[str]) -> UsageError:
    detail: Any = error  # AttributeError(KeyError("'name'\nDid you mean ...?"))
    while isinstance(detail, BaseException) and detail.args:
        detail = detail.args[0]
    key, *hint = str(detail).splitlines() or [""]
    key = key.strip("'\"")
    names = [a.split("=")[0] for a in args[1:]]
    name = next((n for n in names if f".{key}." in n + "."), key)
    return UsageError("; ".join([f"{name}: no such field in the config", *hint]))


# device files of a TPU VM's chips (v4, v5e, v6e: /dev/accel*; v5p: /dev/vfio/N) and of NVIDIA GPUs
TPU_DEVICE_FILES, GPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*"), ("/dev/nvidia[0-9]*",)


def skip_tpu_probe_without_tpu() -> bool:
    """With libtpu installed (the `tpu` or `test` extra) JAX looks for a TPU when it starts,
    even on a machine that has none (seconds, and error lines on stderr). Where no TPU or GPU
    device file exists and JAX_PLATFORMS is unset, the command runs on the CPU without asking;
    returns whether it did so. Call before any JAX computation."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return False
    if any(glob.glob(pattern) for pattern in TPU_DEVICE_FILES + GPU_DEVICE_FILES):
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def run(command: Callable[[list[str]], Any], flag_values: flags.FlagValues,
        argv: Sequence[str] | None = None, *, positional: bool = False) -> None:
    """Parses the flags, calls `command([program, *positional])` and turns expected errors into
    one `error:` line and exit status 2 (see the module docstring). `argv`: the arguments
    after the program name; None: sys.argv, under absl.app.run. On a machine with no
    accelerator, JAX starts on the CPU without probing for a TPU (`skip_tpu_probe_without_tpu`)."""
    debug = False
    skip_tpu_probe_without_tpu()

    def call(rest: list[str]) -> None:
        if not flags.FLAGS["verbosity"].present:  # app.run's default is INFO: orbax and TFDS log
            logging.set_verbosity(logging.WARNING)  # every step of a restore or a build there
        try:
            command(rest)
        except EXPECTED as e:
            fail(e, debug)

    if argv is not None:
        try:
            rest = parse(flag_values, [sys.argv[0], *argv], positional)
        except EXPECTED as e:
            fail(e)
        return call(rest)

    def parse_all(args: list[str]) -> list[str]:
        nonlocal debug
        if any(a in HELP for a in args[1:]):
            _usage(flag_values, full=any(a.endswith("helpfull") for a in args[1:]))
            sys.exit(0)
        _with_absl_flags(flag_values)
        try:
            rest = parse(flag_values, args, positional)
        except EXPECTED as e:
            fail(e)
        flags.FLAGS.mark_as_parsed()  # absl's flags took their values through flag_values
        debug = flags.FLAGS["verbosity"].value >= 1
        return rest

    app.run(call, argv=sys.argv, flags_parser=parse_all)


def define_mesh_flag(flag_values: flags.FlagValues) -> None:
    """`--mesh`: the devices a command's model runs on (`mesh_flag` reads it)."""
    flags.DEFINE_string("mesh", None, "run sharded over the first N devices, e.g. tensor=4 or data=2,tensor=4 "
                        "(axes data, fsdp, tensor; sharding.RULE_SETS['inference']); default: one device",
                        flag_values=flag_values)


def mesh_flag(flag_values: flags.FlagValues):
    """The `--mesh` flag as a jax Mesh over the first devices it needs, or None when not given;
    ValueError naming the sizes when there are not enough devices."""
    if not flag_values.mesh:
        return None
    import jax

    from safevlm_jax import sharding

    shape = sharding.parse_mesh(flag_values.mesh)
    needed = 1
    for size in shape.values():
        needed *= size
    if needed < 1 or needed > jax.device_count():
        raise ValueError(f"--mesh {flag_values.mesh}: needs {needed} devices, {jax.device_count()} available")
    return sharding.make_mesh(shape, jax.devices()[:needed])
