"""The MindSpore runtime: the primitives of the runtime contract (``dvt_core.runtime.contract.Framework``).

Mirrors ``dvt_backends/torch/runtime.py``; every MindSpore version quirk lives in ``compat``.
"""
from __future__ import annotations

from dvt_core.errors import InputError
from dvt_core.runtime.contract import Framework

from . import compat, files
from .cascade import DVT, join, select
from .io import load_state, model_state


class MindSporeFramework(Framework):
    name = "mindspore"
    # measured on MindSpore 2.10's CPU build (README, Performance): what a lower precision would need is missing
    precisions_why = ("MindSpore 2.10's CPU build has no bf16 MatMul or LayerNorm kernel, and its fp16 MatMul "
                      "is no faster than fp32 there")
    # the framework's own functions serve as the contract's members as they are
    model_state = staticmethod(model_state)
    load_state = staticmethod(load_state)
    read_file = staticmethod(files.load)  # tensors and plain values only, never code
    write_file = staticmethod(files.save)
    select = staticmethod(select)
    join = staticmethod(join)

    def build_model(self, spec) -> DVT:
        """A freshly initialised DVT of ``spec``, in evaluation mode (``model.set_train(True)`` to train it)."""
        compat.configure_runtime()
        model = DVT(spec)
        model.set_train(False)
        return model

    def device_for(self, device) -> str:
        """MindSpore's device target ("CPU", "GPU", "Ascend") for ``device`` (cpu, gpu/cuda, ascend/npu)."""
        target = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU", "ascend": "Ascend", "npu": "Ascend"}.get(
            str(device).split(":")[0].lower())
        if target is None:
            raise InputError(f"unknown MindSpore device {device!r}; use cpu, gpu or ascend")
        compat.check_device_target(target)
        return target

    def to_device(self, model: DVT, device) -> DVT:
        """Select MindSpore's (process-wide) device target for ``device``."""
        compat.set_device_target(self.device_for(device))
        return model

    def to_tensor(self, model: DVT, array):
        return compat.to_tensor(array)

    def to_numpy(self, tensor):
        return compat.to_numpy(tensor).astype("float32", copy=False)

    def run_stage(self, model: DVT, index: int, images, carry=None):
        return model.run_stage(index, images, carry)

    def inference(self, model: DVT):
        return model.inference()
