"""The framework-neutral half of every runtime of exported graphs: the model object and the contract's primitives.

A graph runtime (``dvt_backends.onnx``, ``dvt_backends.mindir``, ``dvt_backends.openvino``) is an
:class:`ExportedDVT` subclass that runs one stage's graph (``_run_graph``) and a :class:`GraphRuntimeBase`
subclass that opens a folder into it; everything else is here.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Union

import numpy as np

from dvt_core.errors import InputError, check_images_shape
from dvt_core.export.manifest import MANIFEST, PREV
from dvt_core.runtime.contract import GraphRuntime, ModelAPI

class Carry(dict):
    """What one exported stage hands to the next: graph output name -> array, and each one's batch axis."""

    def __init__(self, items, axes: dict):
        super().__init__(items)
        self.axes = {k: int(axes.get(k, 0)) for k in self}


def select_numpy(images, carry: Optional[Carry], rows):
    """The ``rows`` of a numpy image batch and of its carry (each array along its own batch axis)."""
    rows = np.asarray(rows, dtype=np.int64)
    picked = None if carry is None else Carry({k: np.take(v, rows, axis=carry.axes[k]) for k, v in carry.items()},
                                              carry.axes)
    return np.take(images, rows, axis=0), picked


class ExportedDVT(ModelAPI):
    """A DVT served from exported per-stage graphs; same user API as the framework backends.

    ``model(images)`` returns the tuple of per-exit logits (numpy float32); ``model.adaptive(images,
    thresholds=None)`` runs true early exit (the contract's, written once), with the manifest's default
    thresholds unless others are given. A runtime supplies ``_run_graph(index, feeds) -> list of numpy
    outputs`` (in the manifest's output order) and ``to_device``.
    """

    backend_name = ""  # the runtime's name (how backend_of finds it); set by each runtime's subclass
    graph_format = ""  # the graph files it reads, as the manifest names them

    def __init__(self, directory: Union[str, Path], manifest: dict):
        self.directory = Path(directory)
        self.manifest = manifest
        self.spec = manifest["_spec"]
        self.exit_macs = list(manifest["exit_macs"])
        # the default operating point is the manifest's (dvt calibrate may have rewritten it after export)
        self.checkpoint_meta = {**dict(manifest.get("checkpoint_meta") or {}),
                                **{k: manifest[k] for k in ("thresholds",) if manifest.get(k) is not None}}
        self.training = False
        self._names: dict = {}  # stage index -> what run_stage reads from the manifest (_stage_names)

    # the contract's small operations ----------------------------------------------------------------
    def _run_graph(self, index: int, feeds: dict) -> list:
        raise NotImplementedError

    def run_stage(self, index: int, images, carry: Optional[dict] = None):
        """Logits of exit ``index`` and the carry for the next stage (a dict name -> array; None after the last)."""
        reads, names, axes = self._stage_names(index)
        feeds = {"images": images}
        for name, key in reads:
            feeds[name] = carry[key]
        outs = self._run_graph(index, feeds)
        return outs[0], (Carry(zip(names, outs[1:]), axes) if names else None)

    def _stage_names(self, index: int) -> tuple:
        """Stage ``index``'s (graph input, carry key) pairs, carry output names and their batch axes, read from
        the manifest once (a batch-1 call costs about as much as the manifest look-ups it would repeat)."""
        cache = self._names
        if index not in cache:
            st = self.manifest["stages"][index]
            names = tuple(st["outputs"][1:])
            axes = self.manifest.get("batch_axes") or {}
            cache[index] = (tuple((n, n[len(PREV):]) for n in st["inputs"][1:]), names,
                            {k: int(axes.get(k, 0)) for k in names})
        return cache[index]

    def to_tensor(self, array) -> np.ndarray:
        """A numpy image batch as this runtime's input (checked against the spec)."""
        return self._images(array)

    # user API -----------------------------------------------------------------------------------------
    def _images(self, images) -> np.ndarray:
        if not isinstance(images, np.ndarray) and hasattr(images, "numpy"):
            images = images.numpy()
        x = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        check_images_shape(x.shape, self.spec)
        return x

    def __call__(self, images) -> tuple:
        from dvt_core.runtime.contract import backend_of

        return tuple(backend_of(self).forward_numpy(self, images))

    forward = __call__

    def eval(self):
        return self

    def set_train(self, mode: bool = False):
        if mode:
            raise InputError("an exported DVT runs inference only")
        return self

    def files(self) -> list[Path]:
        return [self.directory / MANIFEST] + [self.directory / st["file"] for st in self.manifest["stages"]]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name}, {self.graph_format} graphs in {self.directory})"


def concatenate_numpy(values, axis: int):
    return np.concatenate([np.asarray(v) for v in values], axis=axis)


class GraphRuntimeBase(GraphRuntime):
    """The contract's primitives for exported graphs, the same for every graph runtime: they call the model's
    own methods and slice numpy carries. A runtime subclasses this, sets ``name`` / ``graph_format`` and
    writes :meth:`open`; one whose arrays are not numpy overrides :meth:`concatenate` and :meth:`select`."""

    def to_device(self, model: ExportedDVT, device) -> ExportedDVT:
        return model.to_device(device)

    def to_tensor(self, model: ExportedDVT, array) -> np.ndarray:
        return model.to_tensor(array)

    def to_numpy(self, tensor) -> np.ndarray:
        return np.asarray(tensor, dtype=np.float32)

    def run_stage(self, model: ExportedDVT, index: int, images, carry=None):
        return model.run_stage(index, images, carry)

    def select(self, images, carry, rows):
        return select_numpy(images, carry, rows)

    def concatenate(self, values, axis: int):
        return concatenate_numpy(values, axis)

    def join(self, parts):
        """Several ``(images, carry)`` batches of one stage as one, concatenated along their batch axes."""
        images = np.concatenate([np.asarray(p[0]) for p in parts])
        first = parts[0][1]
        carry = None if first is None else Carry(
            {k: self.concatenate([p[1][k] for p in parts], first.axes[k]) for k in first}, first.axes)
        return images, carry

    def set_threads(self, model: ExportedDVT, threads: int) -> ExportedDVT:
        if not hasattr(model, "set_threads"):
            return super().set_threads(model, threads)
        return model.set_threads(threads)

    def inference(self, model: ExportedDVT):
        """Exported graphs run inference only: nothing to switch."""
        return contextlib.nullcontext()
