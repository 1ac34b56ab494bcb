"""PyTorch backend: ``build_model(spec)``, ``load_state(model, state)``, ``model_state(model)``."""
from .cascade import DVT, Reuse, Stage
from .io import load_state, model_state

NAME = "torch"


def build_model(spec) -> DVT:
    return DVT(spec)


__all__ = ["DVT", "Stage", "Reuse", "build_model", "load_state", "model_state", "forward_numpy", "adaptive_numpy", "to_device",
           "device_for", "NAME"]


def forward_numpy(model: DVT, images):
    """Per-exit logits of a float32 numpy batch (N, C, H, W), as numpy arrays; no gradients, eval mode."""
    import numpy as np
    import torch

    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(images)).to(dev, dtype))
    model.train(was)
    return [o.float().cpu().numpy() for o in out]


def adaptive_numpy(model: DVT, images, thresholds, confidence: str = "max_softmax"):
    """``model.adaptive`` on a float32 numpy batch."""
    import numpy as np
    import torch

    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    return model.adaptive(torch.from_numpy(np.ascontiguousarray(images)).to(dev, dtype), thresholds, confidence)


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
