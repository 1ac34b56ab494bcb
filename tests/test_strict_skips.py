"""The CI rule of tests/strict_skips.py: with CI=true a skipped ``dataset`` / ``conformance`` test fails
the run; other skips, and every skip outside CI, stay skips."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

@pytest.mark.dataset
@pytest.mark.skipif(True, reason="no data set here")
def test_needs_data():
    pass

@pytest.mark.conformance
def test_needs_fixture():
    pytest.skip("no fixture here")

@pytest.mark.skip(reason="unrelated")
def test_other():
    pass

def test_plain():
    pass
'''


def _pytest(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    dataset: d\n    conformance: c\n")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = dict(os.environ, CI=ci, PYTHONPATH=str(TESTS))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "strict_skips", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_outside_ci_they_skip(tmp_path):
    r = _pytest(tmp_path, "")
    assert r.returncode == 0, r.stdout
    assert "1 passed, 3 skipped" in r.stdout


def test_in_ci_a_skipped_data_set_or_conformance_test_fails(tmp_path):
    r = _pytest(tmp_path, "true")
    assert r.returncode == 1, r.stdout
    assert "skipped in CI (CI=true), where its inputs must be present: no data set here" in r.stdout
    assert "a conformance test skipped in CI" in r.stdout and "no fixture here" in r.stdout
    assert "1 failed, 1 passed, 1 skipped, 1 error" in r.stdout  # the unrelated skip stays a skip
