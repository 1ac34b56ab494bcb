"""ONNX Runtime backend: a DVT exported with ``dvt export --format onnx``, run without torch or MindSpore.

``load(directory)`` (what ``dvt_core.build(DIR, backend="onnx")`` calls) returns an :class:`OnnxDVT`.
Imports onnxruntime and numpy only.
"""
from dvt_core.errors import InputError
from dvt_core.export import select_numpy as select

from .runtime import OnnxDVT, device_for, load

RUNTIME = OnnxDVT

NAME = "onnx"
EXPORTED = True


def forward_numpy(model: OnnxDVT, images):
    return list(model(images))


def adaptive_numpy(model: OnnxDVT, images, thresholds, confidence: str = "max_softmax"):
    return model.adaptive(images, thresholds, confidence)


def to_device(model: OnnxDVT, device) -> OnnxDVT:
    return model.to_device(device)


# ---- the backend contract (dvt_core.backend), where it applies to a fixed, exported graph ----------------


def to_tensor(model, array):
    return model.to_tensor(array)


def to_numpy(tensor):
    return RUNTIME.to_numpy(tensor)


def run_stage(model, index: int, images, carry=None):
    return model.run_stage(index, images, carry)


def build_model(spec):
    raise InputError(f"the {NAME} backend runs exported graphs: make them with `dvt export`, then "
                     f"dvt_core.build(DIR, backend={NAME!r})")


def model_state(model):
    raise InputError(f"an exported {NAME} model has no editable state; export again from a checkpoint")


def load_state(model, state, source: str = "checkpoint"):
    raise InputError(f"an exported {NAME} model's weights are fixed in its graphs; export again with new weights")


def read_file(path):
    raise InputError(f"the {NAME} backend reads export folders, not checkpoint files ({path})")


def write_file(path, state, entries):
    raise InputError(f"the {NAME} backend writes no checkpoints; use torch, safetensors or mindspore")


__all__ = ["OnnxDVT", "load", "forward_numpy", "adaptive_numpy", "to_device", "device_for", "to_tensor", "to_numpy",
           "run_stage", "select", "build_model", "model_state", "load_state", "read_file", "write_file", "NAME"]
