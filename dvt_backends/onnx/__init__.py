"""ONNX Runtime runtime: a DVT exported with ``dvt export --format onnx``, run without torch or MindSpore.

``RUNTIME.open(directory)`` (what ``dvt_core.build(DIR, backend="onnx")`` calls) returns an :class:`OnnxDVT`.
Imports onnxruntime and numpy only; the contract's primitives are those every graph runtime shares
(``dvt_core.export.graph``); what is ONNX Runtime's own lives in ``runtime.py``.
"""
from .runtime import RUNTIME, OnnxDVT, OnnxRuntime

__all__ = ["RUNTIME", "OnnxDVT", "OnnxRuntime"]
