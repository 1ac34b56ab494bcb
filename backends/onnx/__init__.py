"""ONNX Runtime backend: a DVT exported with ``dvt export --format onnx``, run without torch or MindSpore.

``load(directory)`` (what ``dvt_core.build(DIR, backend="onnx")`` calls) returns an :class:`OnnxDVT`.
Imports onnxruntime and numpy only.
"""
from .runtime import OnnxDVT, load

NAME = "onnx"
EXPORTED = True


def forward_numpy(model: OnnxDVT, images):
    return list(model(images))


def adaptive_numpy(model: OnnxDVT, images, thresholds, confidence: str = "max_softmax"):
    return model.adaptive(images, thresholds, confidence)


def to_device(model: OnnxDVT, device) -> OnnxDVT:
    return model.to_device(device)


__all__ = ["OnnxDVT", "load", "forward_numpy", "adaptive_numpy", "to_device", "NAME"]
