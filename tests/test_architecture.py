"""The layering the README draws, checked from the code: import-linter's contracts (``.importlinter``)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from helpers import ROOT


def _lint_imports() -> str:
    """The ``lint-imports`` script of the interpreter running the tests (the dev extra installs it)."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    script = shutil.which("lint-imports", path=path)
    assert script, "lint-imports not found: install the dev extra (pip install -e '.[dev]')"
    return script


def test_the_import_contracts_are_kept():
    # Every import statement counts, those inside functions too: grimp reads the whole syntax tree.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([_lint_imports(), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout, run.stdout


def _contract_layers() -> list[set[str]]:
    """The layers of the ``layers`` contract in ``.importlinter``, top first, each a set of module names."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter", encoding="utf-8")
    lines = [ln.strip() for ln in config["importlinter:contract:layers"]["layers"].splitlines() if ln.strip()]
    return [{name.strip() for name in re.split(r"[|:]", ln)} for ln in lines]


def _layout_rows() -> list[tuple[list[str], set[str]]]:
    """``(modules, dvt_core layers named as importable)`` of each ``dvt_core`` row of the README's layout table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`dvt_core/"):
            continue
        modules = [re.sub(r"^dvt_core/", "", m).strip("/").removesuffix(".py") for m in re.findall(r"`([^`]+)`", cells[0])]
        named = {tok.split(".")[0] for tok in re.findall(r"`([^`]+)`", cells[2])}
        rows.append((modules, named))
    return rows


def test_the_readme_layout_table_says_what_the_contracts_allow():
    layers = _contract_layers()
    known = set().union(*layers)
    covered = set()
    for modules, named in _layout_rows():
        depth = {next(i for i, layer in enumerate(layers) if m in layer) for m in modules}
        assert len(depth) == 1, f"README layout row {modules} mixes layers of .importlinter"
        below = set().union(*layers[depth.pop() + 1:])
        assert named & known == below, (f"README layout row {modules}: its last column names "
                                        f"{sorted(named & known)}; .importlinter lets it import {sorted(below)}")
        covered.update(modules)
    assert covered == known - {"__main__"}, f"layers without a README layout row: {sorted(known - covered - {'__main__'})}"


def test_no_library_function_is_longer_than_60_lines():
    import ast

    long = []
    for path in sorted([*(ROOT / "dvt_core").rglob("*.py"), *(ROOT / "dvt_backends").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "functions over 60 lines: " + "; ".join(long)


def _script_imports() -> list[tuple[str, str, str]]:
    """``(script, module, name)`` for every ``from dvt_... import name`` in ``benchmarks/`` and ``tools/``, those
    inside functions included."""
    import ast

    found = []
    for script in sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("tools/*.py")]):
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in {"dvt_core", "dvt_backends"}:
                found += [(script.name, node.module, alias.name) for alias in node.names]
    return found


def test_the_scripts_import_what_the_library_has():
    # The scripts import inside their functions and no test runs them end to end, so a module that moves
    # would leave them broken until someone measures again: resolve every name they import.
    import importlib

    found = _script_imports()
    assert len(found) > 20, found
    missing = []
    for script, module, name in found:
        try:
            owner = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{script}: {module} ({exc})")
            continue
        if not hasattr(owner, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{script}: {module}.{name}")
    assert not missing, missing
