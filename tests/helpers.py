"""Helpers the test modules share (run the CLI in a fresh process, check its outcome, block imports)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]

BLOCK_IMPORTS = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked in this test)", name=name)
sys.meta_path.insert(0, _Block())
"""


def run_dvt(*args, cwd=None, stdin: Optional[str] = None, block: Iterable[str] = (), timeout: int = 300
            ) -> subprocess.CompletedProcess:
    """``python -m dvt_core ARGS`` in a fresh process (one intra-op thread), with ``block``'s top-level
    modules made unimportable (as if not installed)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
    code = BLOCK_IMPORTS.format(blocked=set(block)) if block else ""
    code += "import sys\nfrom dvt_core.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd or os.getcwd(), env=env,
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def succeeded(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def refused(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Status 2, one stderr line, no traceback; returns the line (checked for ``fragments``)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr}"
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"
    return lines[0]
