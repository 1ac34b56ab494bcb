"""MindSpore backend: every member of the backend contract (``dvt_core.runtime.contract.Backend``).

Mirrors ``dvt_backends.torch`` file for file; every MindSpore version quirk lives in ``compat``.
"""
from __future__ import annotations

from . import compat
from .cascade import DVT, Reuse, Stage, join, select
from .io import load_state, model_state

NAME = "mindspore"
DVT.backend_name = NAME  # how dvt_core.runtime.contract.backend_of finds this backend from a model


def build_model(spec) -> DVT:
    """A freshly initialised DVT of ``spec``, in evaluation mode (``model.set_train(True)`` to train it)."""
    compat.configure_runtime()
    model = DVT(spec)
    model.set_train(False)
    return model


def device_for(device) -> str:
    """MindSpore's device target ("CPU", "GPU", "Ascend") for ``device`` (cpu, gpu/cuda, ascend/npu);
    InputError for an unknown name or a device this build cannot use here."""
    from dvt_core.errors import InputError

    target = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU", "ascend": "Ascend", "npu": "Ascend"}.get(
        str(device).split(":")[0].lower())
    if target is None:
        raise InputError(f"unknown MindSpore device {device!r}; use cpu, gpu or ascend")
    compat.check_device_target(target)
    return target


def to_device(model: DVT, device) -> DVT:
    """Select MindSpore's device target for ``device`` (cpu, gpu/cuda, ascend/npu); InputError otherwise."""
    compat.set_device_target(device_for(device))
    return model


def to_tensor(model: DVT, array):
    """A float32 numpy batch as a MindSpore tensor (the device is MindSpore's process-wide target)."""
    return compat.to_tensor(array)


def to_numpy(tensor):
    """A tensor as a numpy array on the host."""
    return compat.to_numpy(tensor)


def run_stage(model: DVT, index: int, images, carry=None):
    """``model.run_stage``: exit ``index``'s logits and what the next stage reuses."""
    return model.run_stage(index, images, carry)


def inference(model: DVT):
    """``with inference(model):`` evaluation mode without gradients; the previous mode comes back after."""
    return model.inference()


def forward_numpy(model: DVT, images):
    """Per-exit logits of a float32 numpy batch (N, C, H, W), as numpy arrays; eval mode, no gradients."""
    x = to_tensor(model, images)
    was = model.training
    model.set_train(False)
    try:
        out = model(x)
    finally:
        model.set_train(was)
    return [to_numpy(o).astype("float32", copy=False) for o in out]


def adaptive_numpy(model: DVT, images, thresholds, confidence: str = "max_softmax"):
    """``model.adaptive`` on a float32 numpy batch (eval mode)."""
    return model.adaptive(to_tensor(model, images), thresholds, confidence)


def read_file(path) -> dict:
    """A ``.ckpt``'s entries: MindSpore name -> numpy array, appended entries as plain values."""
    from . import files

    return files.load(path)


def write_file(path, state: dict, entries: dict) -> None:
    """``state`` (MindSpore names) and the string ``entries`` (``append_dict``), written by dvt_core.checkpoint.ms_ckpt."""
    from . import files

    files.save(path, state, entries)


__all__ = ["DVT", "Stage", "Reuse", "NAME", "build_model", "load_state", "model_state", "to_device", "device_for",
           "to_tensor", "to_numpy", "run_stage", "select", "join", "inference", "forward_numpy", "adaptive_numpy", "read_file", "write_file"]
