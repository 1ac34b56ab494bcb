"""MindSpore backend: ``build_model(spec)``, ``load_state(model, state)``, ``model_state(model)``.

Mirrors ``dvt_backends.torch`` file for file; every MindSpore version quirk lives in ``compat``.
"""
from . import compat
from .cascade import DVT, Reuse, Stage
from .io import load_state, model_state

NAME = "mindspore"


def build_model(spec) -> DVT:
    compat.configure_runtime()
    return DVT(spec)


def forward_numpy(model: DVT, images):
    """Per-exit logits of a float32 numpy batch (N, C, H, W), as numpy arrays; eval mode, no gradients."""
    was = model.training
    model.set_train(False)
    try:
        out = model(compat.to_tensor(images))
    finally:
        model.set_train(was)
    return [compat.to_numpy(o).astype("float32", copy=False) for o in out]


def adaptive_numpy(model: DVT, images, thresholds, confidence: str = "max_softmax"):
    """``model.adaptive`` on a float32 numpy batch (eval mode)."""
    return model.adaptive(compat.to_tensor(images), thresholds, confidence)


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


__all__ = ["DVT", "Stage", "Reuse", "build_model", "load_state", "model_state", "forward_numpy", "adaptive_numpy",
           "to_device", "device_for", "NAME"]
