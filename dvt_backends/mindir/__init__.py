"""MindIR runtime: a DVT exported with ``dvt export --format mindir``, run through ``mindspore.load`` and
``nn.GraphCell`` (no model code). ``RUNTIME.open(directory)`` is what ``dvt_core.build(DIR, backend="mindir")``
calls; the contract's primitives are those every graph runtime shares (``dvt_core.export.graph``).
"""
from .runtime import RUNTIME, MindirDVT, MindirRuntime

__all__ = ["RUNTIME", "MindirDVT", "MindirRuntime"]
