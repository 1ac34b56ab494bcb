"""In CI (``CI=true``) a skipped test that needs the data set, the conformance fixtures or an export
runtime (onnxruntime, OpenVINO) is a failure.

Locally such tests skip, saying why (``make test`` prints the reasons with ``-ra``); in CI their
inputs must be there, so a skip would hide a test that never ran. Tests opt in with the ``dataset``,
``conformance`` or ``export`` marker. Loaded by tests/conftest.py (and usable as ``-p strict_skips``).
"""
from __future__ import annotations

import os

import pytest

STRICT_MARKERS = ("dataset", "conformance", "export")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci()):
        return
    marker = next((m for m in STRICT_MARKERS if item.get_closest_marker(m) is not None), None)
    if marker is None or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
    report.outcome = "failed"
    report.longrepr = (f"a {marker} test skipped in CI (CI=true), where its inputs must be present: {reason}")
