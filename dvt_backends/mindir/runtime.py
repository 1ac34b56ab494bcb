"""Per-stage MindIR graphs through ``mindspore.load`` / ``nn.GraphCell``, behind the DVT model API."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import mindspore as ms
import numpy as np
from mindspore import nn

from dvt_core.errors import CheckpointError
from dvt_core.export.graph import Carry, ExportedDVT, GraphRuntimeBase
from dvt_core.export.manifest import read_manifest


class MindirDVT(ExportedDVT):
    backend_name = "mindir"
    graph_format = "mindir"

    def __init__(self, directory, manifest: dict):
        super().__init__(directory, manifest)
        cells = []
        for st in manifest["stages"]:
            path = self.directory / st["file"]
            try:
                cells.append(nn.GraphCell(ms.load(str(path))))
            except Exception as exc:  # noqa: BLE001 - MindSpore raises RuntimeError / ValueError variously
                raise CheckpointError(f"{path}: MindSpore cannot load it ({str(exc).splitlines()[0]})") from None
        self.cells = cells

    def to_device(self, device) -> "MindirDVT":
        ms.set_context(device_target=RUNTIME.device_for(device))
        return self

    def _run_graph(self, index: int, feeds: dict) -> list:
        names = self.manifest["stages"][index]["inputs"]
        outs = self.cells[index](*[feeds[n] if isinstance(feeds[n], ms.Tensor) else ms.Tensor(feeds[n])
                                   for n in names])
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return list(outs)


class MindirRuntime(GraphRuntimeBase):
    """MindIR graphs on MindSpore: the carry stays in MindSpore tensors between stages."""

    name = "mindir"
    graph_format = "mindir"

    def device_for(self, device) -> str:
        """MindSpore's device target for ``device`` (cpu, gpu/cuda, ascend/npu), as the MindSpore backend names it."""
        from dvt_core.runtime.contract import get_backend

        return get_backend("mindspore").device_for("cpu" if device is None else device)

    def open(self, directory: Union[str, Path], model: Optional[str] = None, device: str = "cpu",
             precision: str = "fp32", threads: Optional[int] = None) -> MindirDVT:
        self.check_precision(precision)
        manifest = read_manifest(directory, fmt="mindir", model=model)
        return MindirDVT(directory, manifest).to_device(device)

    def to_numpy(self, tensor) -> np.ndarray:
        return (tensor.asnumpy() if isinstance(tensor, ms.Tensor) else np.asarray(tensor)).astype(np.float32,
                                                                                                    copy=False)

    def select(self, images, carry: Optional[Carry], rows):
        """The ``rows`` of a numpy image batch and of its carry; the carry stays in MindSpore tensors."""
        idx = ms.Tensor(np.asarray(rows, dtype=np.int32))
        picked = None if carry is None else Carry(
            {k: v.gather(idx, carry.axes[k]) if isinstance(v, ms.Tensor) else np.take(v, rows, axis=carry.axes[k])
             for k, v in carry.items()}, carry.axes)
        return np.take(images, np.asarray(rows, dtype=np.int64), axis=0), picked

    def concatenate(self, values, axis: int):
        """Carried arrays of several batches as one: MindSpore tensors stay tensors, anything else numpy."""
        if isinstance(values[0], ms.Tensor):
            return ms.ops.cat(tuple(values), axis=axis)
        return np.concatenate([v.asnumpy() if isinstance(v, ms.Tensor) else v for v in values], axis=axis)


RUNTIME = MindirRuntime()
