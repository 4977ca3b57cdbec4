"""The public API (`safevlm_jax.__init__`) and the import structure of the package.

Every exported name resolves, lazily (`import safevlm_jax` alone loads nothing heavy); every
module of the package imports; only command-line modules define command-line flags, and no
library module imports a command-line module or `checkpoints_tools` (which stands on the
library), neither at import time (checked in one subprocess through `sys.modules`) nor inside a
function (checked on the source); the module-level imports have no cycle, so each module
imports alone whatever was imported before.
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import subprocess
import sys

import pytest

import safevlm_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "safevlm_jax"

def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def _is_main_guard(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":` at the top level of a module."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


def _defines_flags(tree: ast.Module) -> bool:
    """Code run at import (not inside a def or class) that defines command-line flags: absl's
    or ml_collections' `DEFINE_*`, or a command's own `FlagValues()` (filled by a helper)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name.startswith("DEFINE_") or name == "FlagValues":
                return True
        todo.extend(ast.iter_child_nodes(node))
    return False


COMMANDS = {name for name, tree in TREES.items()
            if name.endswith(".__main__") or any(map(_is_main_guard, tree.body))}
FLAG_MODULES = {name for name, tree in TREES.items() if _defines_flags(tree)}
CLI_MODULES = COMMANDS | FLAG_MODULES
LIBRARY_MODULES = sorted(set(MODULES) - CLI_MODULES)


def _imported(module: str, node: ast.AST) -> list[str]:
    """The modules an import statement names (for `from a import b`: `a.b` if that is a
    module of the package, else `a`), relative imports resolved."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _imports(module: str, top_level_only: bool) -> set[str]:
    """Modules imported by `module`: all its import statements, or only those that run when
    it is imported (not inside a function or method)."""
    found, todo = set(), list(TREES[module].body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(_imported(module, node))
        elif not (top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))):
            todo.extend(ast.iter_child_nodes(node))
    return found


def _forbidden(name: str) -> bool:
    return name in CLI_MODULES or name == "checkpoints_tools" or name.startswith("checkpoints_tools.")


# ---------------------------------------------------------------------------------------------
_PROBE = r"""
import importlib, json, sys, traceback
library, cli = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))
out, seen = {"errors": {}, "cli_pulled_in": {}}, set()
import safevlm_jax
out["after_package"] = sorted(m for m in sys.modules
                              if m in ("jax", "flax", "transformers") or m.startswith("safevlm_jax."))
for name in library:
    try:
        importlib.import_module(name)
    except BaseException:
        out["errors"][name] = traceback.format_exc(limit=3)
    pulled = {m for m in sys.modules if m in cli or m.split(".")[0] == "checkpoints_tools"} - seen
    if pulled:  # first pulled in by this module
        out["cli_pulled_in"][name] = sorted(pulled)
        seen |= pulled
from absl import flags
for name in sorted(cli):  # each command alone: drop the flags it defined before the next one
    before = set(flags.FLAGS)
    try:
        importlib.import_module(name)
    except BaseException:
        out["errors"][name] = traceback.format_exc(limit=3)
    for flag in set(flags.FLAGS) - before:
        if flag in flags.FLAGS:  # a long name's deletion removes its short name too
            delattr(flags.FLAGS, flag)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    """One subprocess: `import safevlm_jax`, then every library module, then every CLI module."""
    run = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(LIBRARY_MODULES),
                          json.dumps(sorted(CLI_MODULES))],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_public_name_resolves_to_a_documented_object_of_the_package():
    assert safevlm_jax.__all__ == sorted(safevlm_jax._EXPORTS)
    for name in safevlm_jax.__all__:
        obj = getattr(safevlm_jax, name)
        assert obj.__name__ == name and obj.__module__ == safevlm_jax._EXPORTS[name]
        doc = (obj.__doc__ or "").strip()
        assert doc and not doc.startswith(f"{name}("), f"{name} has no docstring of its own"
        assert name in dir(safevlm_jax)
    from safevlm_jax.train.loop import train

    assert safevlm_jax.train.train is train  # the package's entry point, not a second copy
    for name in safevlm_jax._SUBMODULES:  # reachable as attributes, and none is a command line
        assert f"safevlm_jax.{name}" in LIBRARY_MODULES and name in dir(safevlm_jax)
        assert getattr(safevlm_jax, name).__name__ == f"safevlm_jax.{name}"
    with pytest.raises(AttributeError, match="no_such_name"):
        getattr(safevlm_jax, "no_such_name")


def test_the_readme_api_table_names_every_export_and_nothing_else():
    """The README's "Python API" table (first column) lists exactly `__all__`, and the training
    entry point, so a newcomer finds every public name there (the Engine among them)."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    listed = {name for cell in rows for name in re.findall(r"`([\w.]+)`", cell)}
    assert listed == set(safevlm_jax.__all__) | {"safevlm_jax.train.train"}
    assert "Engine" in safevlm_jax.__all__


def test_importing_the_package_loads_no_module_until_a_name_is_used(probe):
    assert probe["after_package"] == []


def test_every_module_of_the_package_imports(probe):
    assert len(LIBRARY_MODULES) > 40 and {"safevlm_jax.sample", "safevlm_jax.scan"} <= CLI_MODULES
    assert probe["errors"] == {}


def test_only_command_line_modules_define_command_line_flags():
    assert {"safevlm_jax.sample", "safevlm_jax.eval.head", "safevlm_jax.train.__main__",
            "safevlm_jax.data.synthetic.__main__"} <= FLAG_MODULES  # DEFINE_*, FlagValues + helper
    assert FLAG_MODULES <= COMMANDS
    assert "safevlm_jax.data.synthetic" in LIBRARY_MODULES  # the generator the training data uses


def test_importing_library_modules_pulls_in_no_cli_module(probe):
    assert probe["cli_pulled_in"] == {}


def test_no_library_module_imports_a_cli_module_even_inside_a_function():
    bad = {m: sorted(filter(_forbidden, _imports(m, top_level_only=False))) for m in LIBRARY_MODULES}
    assert {m: names for m, names in bad.items() if names} == {}


def test_module_level_imports_of_the_package_have_no_cycle():
    graph = {m: {d for d in _imports(m, top_level_only=True) if d in MODULES} for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, f"import cycle: {' -> '.join(path[path.index(d):] + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
