"""PyTorch backend: the DVT cascade in torch and its runtime (``RUNTIME``, a ``dvt_core`` Framework)."""
from __future__ import annotations

from .cascade import DVT, Reuse, Stage
from .runtime import TorchFramework

RUNTIME = TorchFramework()
DVT.backend_name = RUNTIME.name  # how dvt_core.runtime.contract.backend_of finds this runtime from a model

__all__ = ["DVT", "Stage", "Reuse", "TorchFramework", "RUNTIME"]
