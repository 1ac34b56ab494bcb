"""The CI rule of tests/strict_skips.py: with CI=true every skipped test fails the run, whatever its marker
(or none); outside CI a skip stays a skip."""
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

@pytest.mark.serve
def test_needs_a_server():
    pytest.importorskip("no_such_server_package")

def test_plain():
    pass
'''


def _pytest(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    dataset: d\n    conformance: c\n    serve: s\n")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = dict(os.environ, CI=ci, PYTHONPATH=str(TESTS))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "strict_skips", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_outside_ci_they_skip(tmp_path):
    r = _pytest(tmp_path, "")
    assert r.returncode == 0, r.stdout
    assert "1 passed, 4 skipped" in r.stdout


def test_in_ci_every_skip_fails(tmp_path):
    r = _pytest(tmp_path, "true")
    assert r.returncode == 1, r.stdout
    assert "a test marked dataset skipped in CI (CI=true), where everything it needs must be present: " \
           "no data set here" in r.stdout
    assert "a test marked conformance skipped in CI" in r.stdout and "no fixture here" in r.stdout
    assert "a test marked serve skipped in CI" in r.stdout and "no_such_server_package" in r.stdout
    assert "unrelated" in r.stdout
    assert "skipped" not in r.stdout.splitlines()[-1], r.stdout.splitlines()[-1]  # no skip survives
