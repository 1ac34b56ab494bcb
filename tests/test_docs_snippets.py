"""Every ```python block of README.md and docs/*.md runs as written, and every `dvt` command line of their ```bash
blocks names a real command and real options.

Each page's Python blocks run in order, in one fresh interpreter (one namespace, as a reader pasting them into one
session) and one fresh temporary folder. Where a page names a file, the test puts a small stand-in there first,
and only these (:data:`STAND_INS`):

* ``shoe.png``, ``shoe.jpg``, ``bag.png``, ``shirt.png``: 28x28 grey Fashion-MNIST test images (from the subset
  that ships with dvt_core);
* ``fm_onnx/``: what the page's ``dvt export dvt_fashion_mnist --weights default --format onnx --out fm_onnx``
  writes.

Blocks that start Ray (``import ray``) run in their own test (marked ``ray``), in order, in their own folder: the
rest stays well under a minute. A failure names the page, the line its block starts on, and the line inside it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, SUBSET

PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
PICTURES = {"shoe.png": 9, "shoe.jpg": 9, "bag.png": 8, "shirt.png": 6}  # file -> Fashion-MNIST class shown
STAND_INS = {**{name: "a 28x28 grey Fashion-MNIST test image" for name in PICTURES},
             "fm_onnx": "the shipped model's ONNX export (dvt export ... --out fm_onnx)"}

# Runs (label, code) pairs in one namespace; a failure prints its label, the line inside the block, the error
RUNNER = textwrap.dedent("""
    import json, sys, traceback
    namespace = {"__name__": "__main__"}
    for label, code in json.load(open(sys.argv[1])):
        try:
            exec(compile(code, label, "exec"), namespace)
        except BaseException as exc:
            where = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == label]
            line = f", line {where[-1].lineno} of the block" if where else ""
            print(f"{label}{line} fails as written: {type(exc).__name__}: {exc}", file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
""")


def blocks(page: Path, language: str) -> list[tuple[int, str]]:
    """(line the block's code starts on, its code) of every ```language block of ``page``."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text)
            if m.group(1) == language]


def _label(page: Path, line: int) -> str:
    return f"{page.relative_to(ROOT)} (python block at line {line})"


def _python_runs(ray: bool) -> list:
    runs = []
    for page in PAGES:
        chosen = [(line, code) for line, code in blocks(page, "python") if ("import ray" in code) == ray]
        if chosen:
            runs.append(pytest.param(page, chosen, id=str(page.relative_to(ROOT)),
                                     marks=[pytest.mark.ray] if ray else []))
    return runs


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    """The shipped model's ONNX export, made once (only when a page names fm_onnx)."""
    pytest.importorskip("onnx")
    from dvt_core.export.writer import export

    return export("dvt_fashion_mnist", weights="default", fmt="onnx", out=tmp_path_factory.mktemp("fm") / "fm_onnx")


def _stand_ins(folder: Path, code: str, request) -> None:
    from PIL import Image

    with np.load(SUBSET) as z:
        images, labels = z["images"], z["labels"]
    for name, cls in PICTURES.items():
        if name in code:
            Image.fromarray(images[int(np.flatnonzero(labels == cls)[0])], "L").save(folder / name)
    if "fm_onnx" in code:
        shutil.copytree(request.getfixturevalue("onnx_export"), folder / "fm_onnx")


def _run_page(page: Path, chosen: list, tmp_path: Path, request) -> None:
    folder = tmp_path / "reader"
    folder.mkdir()
    _stand_ins(folder, "\n".join(code for _, code in chosen), request)
    script = tmp_path / "blocks.json"
    script.write_text(json.dumps([(_label(page, line), code) for line, code in chosen]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(script)], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)
    said = [ln for ln in proc.stderr.splitlines() if "fails as written" in ln] or ["(no block named)"]
    assert proc.returncode == 0, f"{said[0]}\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize("page, chosen", _python_runs(ray=False))
def test_python_blocks_run_as_written(page, chosen, tmp_path, request):
    _run_page(page, chosen, tmp_path, request)


@pytest.mark.parametrize("page, chosen", _python_runs(ray=True))
def test_python_blocks_starting_ray_run_as_written(page, chosen, tmp_path, request):
    _run_page(page, chosen, tmp_path, request)


# ---- shell blocks: every `dvt` command line names a real command and real options -------------------------------

def _command_lines(code: str) -> list[list[str]]:
    """The words of every ``dvt ...`` / ``python -m dvt_core ...`` command in a shell block (pipes and ``&&``
    split, continuation lines joined, comments dropped)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        command: list[str] = []
        for w in words + ["|"]:
            if w in ("|", "&&", "||", ";"):
                if command[:1] == ["dvt"] or command[:3] == ["python", "-m", "dvt_core"]:
                    out.append(command[1:] if command[0] == "dvt" else command[3:])
                command = []
            elif command or "=" not in w:  # leading VAR=value assignments are not the command
                command.append(w)
    return out


def _subcommands() -> dict:
    from dvt_core.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(getattr(a, "choices", None), dict))
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def test_shell_blocks_use_real_commands_and_options():
    commands, wrong = _subcommands(), []
    for page in PAGES:
        for line, code in blocks(page, "bash") + blocks(page, "sh"):
            for words in _command_lines(code):
                where = f"{page.relative_to(ROOT)} (bash block at line {line}): dvt {' '.join(words)}"
                if not words or words[0] in ("--version", "--help", "-h"):
                    continue
                if words[0] not in commands:
                    wrong.append(f"{where}: no command {words[0]!r}")
                    continue
                for w in words[1:]:
                    flag = w.split("=")[0]
                    if flag.startswith("--") and flag not in commands[words[0]]:
                        wrong.append(f"{where}: dvt {words[0]} has no option {flag}")
    assert not wrong, "\n".join(wrong)
