"""Helpers of the hostile-input tests: run the CLI in a subprocess under an address-space limit, and check
that a refusal is status 2 with one line on stderr."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEM_LIMIT = 6 << 30  # address space; importing torch/MindSpore maps ~3 GB, the bombs ask for far more


def limit_memory(limit: int = MEM_LIMIT):
    """A ``preexec_fn`` that caps the child's address space at ``limit`` bytes."""
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def run(args, cwd, backend="torch", timeout=240, preexec_fn=None, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    cmd = [sys.executable, "-m", "dvt_core", *map(str, args)]
    if backend and args and args[0] in ("predict", "evaluate"):
        cmd += ["--backend", backend]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn or limit_memory())


def refused(proc, *needles, status=2):
    """Status 2 (or ``status``), one line on stderr naming the problem, no traceback, no signal."""
    assert proc.returncode == status, f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("[WARNING")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
