"""Shared set-up of the cross-backend parity suite (torch vs MindSpore).

Every test module here needs both frameworks and starts with ``pytest.importorskip("mindspore")``, so
without mindspore each is skipped with that reason. Models are small overrides of the zoo entries
unless a test is marked ``slow``. Shared helpers live in ``tests/helpers.py``.
"""
from __future__ import annotations

from helpers import SMALL, SMALL_T2T, random_images, small_overrides  # noqa: F401  (the suite's shared helpers)


# ---- the worst differences, listed at the end of the run ----------------------------------------------

WORST: dict[str, list[float]] = {}


def record_worst(label: str, diffs) -> None:
    """Keep each exit's max |MindSpore - reference| of ``label`` for the terminal summary."""
    WORST[label] = [float(d) for d in diffs]


def pytest_terminal_summary(terminalreporter):
    if not WORST:
        return
    terminalreporter.section("MindSpore parity: max |difference| per exit")
    width = max(len(k) for k in WORST)
    for label, diffs in WORST.items():
        terminalreporter.write_line(f"{label:<{width}}  worst {max(diffs):.2e}  per exit "
                                    + " ".join(f"{d:.2e}" for d in diffs))
