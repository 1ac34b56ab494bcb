"""MindIR backend: a DVT exported with ``dvt export --format mindir``, run through ``mindspore.load``
and ``nn.GraphCell`` (no model code). ``load(directory)`` is what ``dvt_core.build(DIR, backend="mindir")``
calls.
"""
from .runtime import MindirDVT, load

NAME = "mindir"
EXPORTED = True


def forward_numpy(model: MindirDVT, images):
    return list(model(images))


def adaptive_numpy(model: MindirDVT, images, thresholds, confidence: str = "max_softmax"):
    return model.adaptive(images, thresholds, confidence)


def to_device(model: MindirDVT, device) -> MindirDVT:
    return model.to_device(device)


__all__ = ["MindirDVT", "load", "forward_numpy", "adaptive_numpy", "to_device", "NAME"]
