"""In CI (``CI=true``) a skipped test is a failure, whatever its marker.

Locally a test whose inputs are missing (the data set, the conformance fixtures, an optional framework or
runtime) skips, saying why (``make test`` prints the reasons with ``-ra``); in CI everything it needs is
installed by ``make test`` and ``.ci/run``, so a skip would hide a test that never ran. Loaded by
tests/conftest.py (and usable as ``-p strict_skips``).
"""
from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    markers = sorted({m.name for m in item.iter_markers()} - {"parametrize", "skipif", "skip", "usefixtures",
                                                              "filterwarnings"})
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
    what = f"a test marked {', '.join(markers)}" if markers else "a test"
    report.outcome = "failed"
    report.longrepr = f"{what} skipped in CI (CI=true), where everything it needs must be present: {reason}"
