"""Where the backends live: ``dvt_backends`` when installed, the ``backends/`` folder in a source checkout.

The repository keeps the readable layout ``backends/torch``, ``backends/mindspore``; the wheel maps
that folder to the package ``dvt_backends`` (``setup.py``), so an installed dvt adds no generic
top-level module name. In a checkout the folder beside this ``dvt_core`` is registered under the
installed name, so ``import dvt_backends.torch`` means the same thing in both.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BACKENDS_PACKAGE = "dvt_backends"


def register_checkout_backends() -> None:
    """Make ``dvt_backends`` the ``backends/`` folder beside this package, if there is one."""
    if BACKENDS_PACKAGE in sys.modules:
        return
    folder = Path(__file__).resolve().parent.parent / "backends"
    init = folder / "__init__.py"
    if not init.is_file():
        return  # an installed dvt: dvt_backends is a real package
    spec = importlib.util.spec_from_file_location(BACKENDS_PACKAGE, init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[BACKENDS_PACKAGE] = module
    spec.loader.exec_module(module)
