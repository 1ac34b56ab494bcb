"""The registry of runtimes: each name, the package that implements it and what it needs, imported on
first use. The one door from dvt_core to ``dvt_backends``: :func:`dvt_core.runtime.contract.get_backend`
(which also checks the package fulfils the contract) and the checkpoint readers that need a framework's own
file format reach a backend only through :func:`import_runtime`.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

from dvt_core.errors import InputError

# runtime name -> (its package, the third-party package it cannot run without, what it runs: "spec" for a
# framework that builds models from specs, "export" for a runtime of `dvt export` folders).
RUNTIMES = {
    "torch": ("dvt_backends.torch", "torch", "spec"),
    "mindspore": ("dvt_backends.mindspore", "mindspore", "spec"),
    "onnx": ("dvt_backends.onnx", "onnxruntime", "export"),
    "mindir": ("dvt_backends.mindir", "mindspore", "export"),
    "openvino": ("dvt_backends.openvino", "openvino", "export"),
    "pt2": ("dvt_backends.pt2", "torch", "export"),
}


def raised_by_dvt(exc: ImportError) -> bool:
    """True when ``exc`` names a dvt module, or was raised by a line of dvt itself (not of a framework)."""
    if (exc.name or "").split(".")[0] in ("dvt_core", "dvt_backends"):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or exc.name:
        return False
    ours = [Path(__file__).resolve().parent]  # dvt_core, and wherever dvt_backends lives
    backends = sys.modules.get("dvt_backends")
    ours += [Path(p).resolve() for p in getattr(backends, "__path__", ())]
    try:
        where = Path(tb.tb_frame.f_code.co_filename).resolve()
    except (OSError, ValueError):
        return False
    return any(where.is_relative_to(d) for d in ours)


def import_runtime(name: str, module: str = "") -> ModuleType:
    """The package of runtime ``name`` (or its sub-module ``module``), imported now; InputError naming what
    is wrong (an unknown name, a framework that is not installed)."""
    if name not in RUNTIMES:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(RUNTIMES)}")
    package, needs, _ = RUNTIMES[name]
    try:
        return importlib.import_module(f"{package}.{module}" if module else package)
    except ImportError as exc:
        # A framework that is missing or broken is the user's to install; an ImportError raised by dvt's
        # own code is a bug and keeps its traceback.
        if raised_by_dvt(exc):
            raise
        raise InputError(f"the {name} backend needs the {needs} package ({exc}); "
                         f"install it with: pip install 'dvt[{name}]'") from None


def runtime_names(runs: Optional[str] = None) -> tuple[str, ...]:
    """The registered runtimes (``runs="spec"``: the frameworks; ``"export"``: the export-folder runtimes),
    without importing any of them."""
    return tuple(n for n, (_, _, kind) in RUNTIMES.items() if runs is None or kind == runs)
