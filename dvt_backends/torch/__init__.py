"""PyTorch backend: every member of the backend contract (``dvt_core.runtime.contract.Backend``)."""
from __future__ import annotations

from .cascade import DVT, Reuse, Stage, join, select
from .io import load_state, model_state

NAME = "torch"
DVT.backend_name = NAME  # how dvt_core.runtime.contract.backend_of finds this backend from a model


def build_model(spec) -> DVT:
    """A freshly initialised DVT of ``spec``, in evaluation mode (``model.train()`` to train it)."""
    return DVT(spec).eval()


def device_for(device):
    """The ``torch.device`` named by ``device``; InputError for one torch does not have here."""
    import torch

    from dvt_core.errors import InputError

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown torch device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but torch sees no CUDA device")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"device {device!r} asked for, but torch sees no MPS device")
    return dev


def to_device(model: DVT, device) -> DVT:
    """``model.to(device)``, with a clear InputError for a device torch does not have here."""
    return model.to(device_for(device))


def to_tensor(model: DVT, array):
    """A float32 numpy batch as a tensor on the model's device, in its dtype."""
    import numpy as np
    import torch

    p = next(model.parameters())
    return torch.from_numpy(np.ascontiguousarray(array)).to(p.device, p.dtype)


def to_numpy(tensor):
    """A tensor as a float32 numpy array on the host."""
    return tensor.detach().float().cpu().numpy()


def run_stage(model: DVT, index: int, images, carry=None):
    """``model.run_stage`` without gradients: exit ``index``'s logits and what the next stage reuses."""
    import torch

    with torch.no_grad():
        return model.run_stage(index, images, carry)


def inference(model: DVT):
    """``with inference(model):`` evaluation mode without gradients; the previous mode comes back after."""
    return model.inference()


def forward_numpy(model: DVT, images):
    """Per-exit logits of a float32 numpy batch (N, C, H, W), as numpy arrays; no gradients, eval mode."""
    import torch

    x = to_tensor(model, images)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was)
    return [to_numpy(o) for o in out]


def adaptive_numpy(model: DVT, images, thresholds, confidence: str = "max_softmax"):
    """``model.adaptive`` on a float32 numpy batch."""
    return model.adaptive(to_tensor(model, images), thresholds, confidence)


def set_precision(model: DVT, precision: str) -> DVT:
    """The model held and run in ``precision`` ("fp32", "bf16", "fp16"): ``model.set_precision``."""
    return model.set_precision(precision)


def read_file(path) -> dict:
    """A torch file's content (``torch.load(weights_only=True)``), tensors as numpy arrays."""
    from . import files

    return files.load(path)


def write_file(path, state: dict, entries: dict) -> None:
    """``{"state_dict": state, **entries}`` with ``torch.save``."""
    from . import files

    files.save(path, state, entries)


__all__ = ["DVT", "Stage", "Reuse", "NAME", "build_model", "load_state", "model_state", "to_device", "device_for",
           "to_tensor", "to_numpy", "run_stage", "select", "join", "inference", "forward_numpy", "adaptive_numpy", "set_precision", "read_file", "write_file"]
