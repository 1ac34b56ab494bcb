"""The layering the README draws, checked from the code: import-linter's contracts (``.importlinter``)."""
from __future__ import annotations

import os
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
