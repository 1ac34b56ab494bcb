"""The torch runtime: the primitives of the runtime contract (``dvt_core.runtime.contract.Framework``).

Mirrors ``dvt_backends/mindspore/runtime.py``. Everything derived from these (every exit's logits, early
exit, ``model.adaptive``) is written once in the contract, not here.
"""
from __future__ import annotations

import numpy as np
import torch

from dvt_core.errors import InputError
from dvt_core.runtime.contract import PRECISIONS, Framework

from . import files
from .cascade import DVT, join, select
from .io import load_state, model_state


class TorchFramework(Framework):
    name = "torch"
    precisions = PRECISIONS
    # the framework's own functions serve as the contract's members as they are
    model_state = staticmethod(model_state)
    load_state = staticmethod(load_state)
    read_file = staticmethod(files.load)  # tensors and plain values only, never code
    write_file = staticmethod(files.save)
    select = staticmethod(select)
    join = staticmethod(join)

    def set_threads(self, model: DVT, threads: int) -> DVT:
        torch.set_num_threads(int(threads))  # process-wide in torch
        return model

    def build_model(self, spec) -> DVT:
        """A freshly initialised DVT of ``spec``, in evaluation mode (``model.train()`` to train it)."""
        return DVT(spec).eval()

    def device_for(self, device) -> torch.device:
        """The ``torch.device`` named by ``device``; InputError for one torch does not have here."""
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise InputError(f"unknown torch device {device!r}; use cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but torch sees no CUDA device")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"device {device!r} asked for, but torch sees no MPS device")
        return dev

    def to_device(self, model: DVT, device) -> DVT:
        return model.to(self.device_for(device))

    def to_tensor(self, model: DVT, array) -> torch.Tensor:
        """A float32 numpy batch as a tensor on the model's device, in its dtype."""
        p = next(model.parameters())
        return torch.from_numpy(np.ascontiguousarray(array)).to(p.device, p.dtype)

    def to_numpy(self, tensor) -> np.ndarray:
        return tensor.detach().float().cpu().numpy()

    def run_stage(self, model: DVT, index: int, images, carry=None):
        with torch.no_grad():
            return model.run_stage(index, images, carry)

    def inference(self, model: DVT):
        return model.inference()

    def set_precision(self, model: DVT, precision: str) -> DVT:
        """The model held and run in ``precision`` (``DVT.set_precision``: weights, buffers and activations)."""
        return model.set_precision(self.check_precision(precision))
