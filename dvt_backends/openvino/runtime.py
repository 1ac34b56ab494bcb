"""Per-stage ONNX graphs on OpenVINO, behind the DVT model API (no torch, no MindSpore).

OpenVINO reads the ``dvt export --format onnx`` folder as it is (its ONNX frontend); each stage is
compiled once for the CPU with the precision and thread count asked for. ``precision`` is OpenVINO's
``INFERENCE_PRECISION_HINT``: "fp32", "bf16" or "fp16". A CPU without the instructions for a
precision runs the nearest one it has (fp16 runs as bf16 on a CPU with AVX512-BF16 but not
AVX512-FP16, bf16 as fp32 on one with neither): :attr:`OpenVinoDVT.inference_precision` says what
OpenVINO actually chose, read back from the compiled graphs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import openvino as ov

from dvt_core.errors import CheckpointError, InputError
from dvt_core.export.graph import ExportedDVT, GraphRuntimeBase
from dvt_core.export.manifest import read_manifest

PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}  # dvt's names -> OpenVINO's element types
DEVICES = {"cpu": "CPU"}
_CORE: Optional[ov.Core] = None


def core() -> ov.Core:
    """The one ``openvino.Core`` of the process (it caches plugins; making one per model is slow)."""
    global _CORE
    if _CORE is None:
        _CORE = ov.Core()
    return _CORE


def check_threads(threads) -> Optional[int]:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be a positive whole number, not {threads!r}")
    return threads


class OpenVinoDVT(ExportedDVT):
    """An ONNX export compiled by OpenVINO; ``precision`` and ``threads`` may be changed after loading.

    Each stage is compiled with a dynamic batch axis; the batch sizes in ``static_batches`` (batch 1 by
    default: one image at a time, where the per-call cost is most of the time) get their own compilation
    with every shape fixed, made on first use, which skips OpenVINO's shape inference in every call.
    """

    backend_name = "openvino"
    graph_format = "onnx"  # what it reads

    def __init__(self, directory, manifest: dict, device: str = "cpu", precision: str = "fp32",
                 threads: Optional[int] = None, static_batches: tuple = (1,)):
        super().__init__(directory, manifest)
        self.precision = RUNTIME.check_precision(precision)
        self.threads = check_threads(threads)
        self.device = None
        self.graphs: list = []  # per stage: the model as read (recompiled when an option changes)
        for st in manifest["stages"]:
            path = self.directory / st["file"]
            try:
                graph = core().read_model(str(path))
            except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with its own messages
                raise CheckpointError(f"{path}: OpenVINO cannot read it ({str(exc).strip().splitlines()[0]})") from None
            names_in = [i.get_any_name() for i in graph.inputs]
            names_out = [o.get_any_name() for o in graph.outputs]
            if names_in != st["inputs"] or names_out != st["outputs"]:
                raise CheckpointError(f"{path}: its inputs {names_in} / outputs {names_out} differ from the "
                                      f"manifest's {st['inputs']} / {st['outputs']}")
            self.graphs.append(graph)
        self.static_batches = tuple(int(b) for b in static_batches)
        self.compiled: list = []
        self.requests: list = []
        self._static_requests: dict = {}  # (stage, batch size) -> infer request of the fixed-shape compilation
        self.to_device(device)

    def config(self) -> dict:
        """The compile options: precision hint, threads, latency (one stream: a request runs on every thread)."""
        cfg = {"INFERENCE_PRECISION_HINT": PRECISIONS[self.precision], "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = int(self.threads)
        return cfg

    def to_device(self, device) -> "OpenVinoDVT":
        target = RUNTIME.device_for(device)
        self.compiled = [self._compile(i, graph, target) for i, graph in enumerate(self.graphs)]
        self.requests = [c.create_infer_request() for c in self.compiled]
        self._static_requests = {}
        self.device = str(device or "cpu").split(":")[0].lower()
        self._target = target
        return self

    def _compile(self, index: int, graph, target: str):
        try:
            return core().compile_model(graph, target, self.config())
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with its own messages
            raise CheckpointError(f"{self.directory / self.manifest['stages'][index]['file']}: OpenVINO cannot "
                                  f"compile it ({str(exc).strip().splitlines()[0]})") from None

    def _request(self, index: int, batch: int):
        """The infer request for ``batch`` images at stage ``index`` and, for a fixed-shape one (a static batch
        size), its own input buffers (numpy views), which a call fills in place; None for the dynamic one."""
        if batch not in self.static_batches:
            return self.requests[index], None
        key = (index, batch)
        if key not in self._static_requests:
            self._static_requests[key] = self._fixed_shape_request(index, batch)
        return self._static_requests[key]

    def _fixed_shape_request(self, index: int, batch: int):
        graph = self.graphs[index].clone()
        shapes = {}
        for inp in graph.inputs:
            dims = list(inp.get_partial_shape())[1:]
            if not all(d.is_static for d in dims):  # only the batch axis may be dynamic for a fixed shape
                return self.requests[index], None
            shapes[inp.get_any_name()] = [batch] + [d.get_length() for d in dims]
        graph.reshape(shapes)
        request = self._compile(index, graph, self._target).create_infer_request()
        # a call fills the request's own input tensors: binding a new ov.Tensor per input per call cost about
        # 35 us more at batch 1 (the shipped model's stages take 150 to 700 us)
        return request, [request.get_input_tensor(i).data for i in range(len(graph.inputs))]

    def set_precision(self, precision: str) -> "OpenVinoDVT":
        """Compute in ``precision`` ("fp32", "bf16", "fp16"); the stages are compiled anew."""
        self.precision = RUNTIME.check_precision(precision)
        return self.to_device(self.device)

    def set_threads(self, threads: Optional[int]) -> "OpenVinoDVT":
        """OpenVINO inference threads (``None``: its default, every core); the stages are compiled anew."""
        self.threads = check_threads(threads)
        return self.to_device(self.device)

    @property
    def inference_precision(self) -> str:
        """The precision OpenVINO computes in on this CPU (dvt's name), which may differ from the one asked for."""
        got = self.compiled[0].get_property("INFERENCE_PRECISION_HINT").get_type_name()
        return {ov_name: name for name, ov_name in PRECISIONS.items()}.get(got, got)

    def _run_graph(self, index: int, feeds: dict) -> list:
        st = self.manifest["stages"][index]
        request, buffers = self._request(index, len(feeds["images"]))
        if buffers is None:
            for i, name in enumerate(st["inputs"]):  # the graph's input order (checked against the manifest on load)
                request.set_input_tensor(i, ov.Tensor(np.ascontiguousarray(feeds[name], dtype=np.float32),
                                                      shared_memory=True))
        else:
            for buffer, name in zip(buffers, st["inputs"]):
                value = np.asarray(feeds[name])
                if value.shape != buffer.shape:  # numpy would broadcast a smaller array without a word
                    raise InputError(f"stage {index + 1} input {name}: shape {tuple(value.shape)}, the graph "
                                     f"reads {tuple(buffer.shape)}")
                buffer[...] = value
        # infer() returns copies of the outputs (share_outputs=False): the request's own output buffers are
        # reused by its next call, and a carry outlives that (streaming joins carries of several calls)
        return list(request.infer(share_outputs=False).to_tuple())


class OpenVinoRuntime(GraphRuntimeBase):
    """ONNX graphs compiled by OpenVINO for the CPU, in fp32, bf16 or fp16 (its inference precision hint)."""

    name = "openvino"
    graph_format = "onnx"
    precisions = tuple(PRECISIONS)

    def device_for(self, device) -> str:
        """OpenVINO's device name for ``device`` (cpu); InputError for one it lacks here."""
        kind = str(device or "cpu").split(":")[0].lower()
        if kind not in DEVICES:
            raise InputError(f"unknown OpenVINO device {device!r}; use cpu")
        if DEVICES[kind] not in core().available_devices:
            raise InputError(f"device {device!r} asked for, but this OpenVINO has no {DEVICES[kind]} plugin")
        return DEVICES[kind]

    def open(self, directory: Union[str, Path], model: Optional[str] = None, device: str = "cpu",
             precision: str = "fp32", threads: Optional[int] = None) -> OpenVinoDVT:
        self.check_precision(precision)
        check_threads(threads)
        self.device_for(device)
        manifest = read_manifest(directory, fmt="onnx", model=model)
        return OpenVinoDVT(directory, manifest, device=device, precision=precision, threads=threads)

    def set_precision(self, model: OpenVinoDVT, precision: str) -> OpenVinoDVT:
        """The model compiled anew to compute in ``precision`` (OpenVINO's inference precision hint)."""
        return model.set_precision(precision)


RUNTIME = OpenVinoRuntime()
