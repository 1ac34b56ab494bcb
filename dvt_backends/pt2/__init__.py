"""AOTInductor runtime: a DVT exported with ``dvt export --format pt2`` (one compiled package per stage), run
without the model code and without compiling anything. ``RUNTIME.open(directory)`` is what
``dvt_core.build(DIR, backend="pt2")`` calls. Imports torch (its AOTInductor loader) and numpy only.
"""
from .runtime import RUNTIME, Pt2DVT, Pt2Runtime

__all__ = ["RUNTIME", "Pt2DVT", "Pt2Runtime"]
