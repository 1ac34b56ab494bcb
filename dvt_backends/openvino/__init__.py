"""OpenVINO runtime: a DVT exported with ``dvt export --format onnx``, compiled by OpenVINO, run without torch or
MindSpore.

``RUNTIME.open(directory, precision=..., threads=...)`` (what ``dvt_core.build(DIR, backend="openvino")``
calls) returns an :class:`OpenVinoDVT`. Imports openvino and numpy only; the contract's primitives are those
every graph runtime shares (``dvt_core.export.graph``); what is OpenVINO's own lives in ``runtime.py``.
"""
from .runtime import RUNTIME, OpenVinoDVT, OpenVinoRuntime

__all__ = ["RUNTIME", "OpenVinoDVT", "OpenVinoRuntime"]
