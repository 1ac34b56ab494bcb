"""OpenVINO backend: a DVT exported with ``dvt export --format onnx``, compiled by OpenVINO, run without
torch or MindSpore.

``load(directory, precision=..., threads=...)`` (what ``dvt_core.build(DIR, backend="openvino")`` calls)
returns an :class:`OpenVinoDVT`. Imports openvino and numpy only. The contract's members are those every
export runtime shares (``dvt_core.export.writer``); what is OpenVINO's own lives in ``runtime.py``.
"""
import numpy as np

from dvt_core.export.writer import (adaptive_numpy, forward_numpy, inference, join_with, refusals, run_stage, to_device,
                                    to_tensor)
from dvt_core.export.writer import select_numpy as select

from .runtime import PRECISIONS, OpenVinoDVT, device_for, load

NAME = "openvino"
EXPORTED = True
RUNTIME = OpenVinoDVT

to_numpy = OpenVinoDVT.to_numpy
join = join_with(np.concatenate)
build_model, model_state, load_state, read_file, write_file = refusals(NAME)

__all__ = ["OpenVinoDVT", "PRECISIONS", "load", "forward_numpy", "adaptive_numpy", "to_device", "device_for",
           "to_tensor", "to_numpy", "run_stage", "select", "join", "inference", "build_model", "model_state",
           "load_state", "read_file", "write_file", "NAME"]
