"""MindIR backend: a DVT exported with ``dvt export --format mindir``, run through ``mindspore.load``
and ``nn.GraphCell`` (no model code). ``load(directory)`` is what ``dvt_core.build(DIR, backend="mindir")``
calls. The contract's members are those every export runtime shares (``dvt_core.export.writer``); what is
MindSpore's own (graph cells, tensors that stay on the device) lives in ``runtime.py``.
"""
from dvt_core.export.writer import (adaptive_numpy, forward_numpy, inference, join_with, refusals, run_stage, to_device,
                             to_tensor)

from .runtime import MindirDVT, concatenate, device_for, load, select

NAME = "mindir"
EXPORTED = True
RUNTIME = MindirDVT

to_numpy = MindirDVT.to_numpy
join = join_with(concatenate)
build_model, model_state, load_state, read_file, write_file = refusals(NAME)

__all__ = ["MindirDVT", "load", "forward_numpy", "adaptive_numpy", "to_device", "device_for", "to_tensor", "to_numpy",
           "run_stage", "select", "join", "inference", "build_model", "model_state", "load_state", "read_file",
           "write_file", "NAME"]
