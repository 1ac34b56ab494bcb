"""Per-stage MindIR graphs through ``mindspore.load`` / ``nn.GraphCell``, behind the DVT model API."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import mindspore as ms
import numpy as np
from mindspore import nn

from dvt_core.errors import CheckpointError
from dvt_core.export.writer import Carry, ExportedDVT, read_manifest

def device_for(device) -> str:
    """MindSpore's device target for ``device`` (cpu, gpu/cuda, ascend/npu), as the MindSpore backend names it."""
    from dvt_backends.mindspore import device_for as mindspore_device_for

    return mindspore_device_for("cpu" if device is None else device)


class MindirDVT(ExportedDVT):
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
        ms.set_context(device_target=device_for(device))
        return self

    def _run_graph(self, index: int, feeds: dict) -> list:
        names = self.manifest["stages"][index]["inputs"]
        outs = self.cells[index](*[feeds[n] if isinstance(feeds[n], ms.Tensor) else ms.Tensor(feeds[n])
                                   for n in names])
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return list(outs)

    def select(self, images, carry, rows):
        return select(images, carry, rows)

    @staticmethod
    def to_numpy(tensor) -> np.ndarray:
        return (tensor.asnumpy() if isinstance(tensor, ms.Tensor) else np.asarray(tensor)).astype(np.float32, copy=False)


def select(images, carry: Optional[Carry], rows):
    """The ``rows`` of a numpy image batch and of its carry; the carry stays in MindSpore tensors."""
    idx = ms.Tensor(np.asarray(rows, dtype=np.int32))
    picked = None if carry is None else Carry(
        {k: v.gather(idx, carry.axes[k]) if isinstance(v, ms.Tensor) else np.take(v, rows, axis=carry.axes[k])
         for k, v in carry.items()}, carry.axes)
    return np.take(images, np.asarray(rows, dtype=np.int64), axis=0), picked


def load(directory: Union[str, Path], model: Optional[str] = None, device: Optional[str] = None) -> MindirDVT:
    """The exported DVT in ``directory`` on MindSpore; ``model`` (a zoo name) must match when given."""
    manifest = read_manifest(directory, fmt="mindir", model=model)
    m = MindirDVT(directory, manifest)
    return m.to_device(device) if device is not None else m


def concatenate(values, axis: int):
    """Carried arrays of several batches as one: MindSpore tensors stay tensors, anything else numpy."""
    if isinstance(values[0], ms.Tensor):
        return ms.ops.cat(tuple(values), axis=axis)
    return np.concatenate([v.asnumpy() if isinstance(v, ms.Tensor) else v for v in values], axis=axis)
