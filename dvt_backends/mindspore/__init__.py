"""MindSpore backend: the DVT cascade in MindSpore and its runtime (``RUNTIME``, a ``dvt_core`` Framework).

Mirrors ``dvt_backends.torch`` file for file; every MindSpore version quirk lives in ``compat``.
"""
from __future__ import annotations

from .cascade import DVT, Reuse, Stage
from .runtime import MindSporeFramework

RUNTIME = MindSporeFramework()
DVT.backend_name = RUNTIME.name  # how dvt_core.runtime.contract.backend_of finds this runtime from a model

__all__ = ["DVT", "Stage", "Reuse", "MindSporeFramework", "RUNTIME"]
