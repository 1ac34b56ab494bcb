"""Per-stage ONNX graphs on ONNX Runtime, behind the DVT model API (no torch, no MindSpore)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import onnxruntime as ort

from dvt_core.errors import CheckpointError, InputError
from dvt_core.export.graph import ExportedDVT, GraphRuntimeBase
from dvt_core.export.manifest import read_manifest

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class OnnxDVT(ExportedDVT):
    backend_name = "onnx"
    graph_format = "onnx"

    def __init__(self, directory, manifest: dict, device: str = "cpu", threads: Optional[int] = None):
        super().__init__(directory, manifest)
        self.threads = threads
        self.device = None
        self.sessions = []
        self.to_device(device)

    def to_device(self, device) -> "OnnxDVT":
        provider = RUNTIME.device_for(device)
        kind = str(device or "cpu").split(":")[0].lower()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
        sessions = []
        for st in self.manifest["stages"]:
            path = self.directory / st["file"]
            check_external_data(path, self.directory)
            try:
                s = ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
            names_in = [i.name for i in s.get_inputs()]
            names_out = [o.name for o in s.get_outputs()]
            if names_in != st["inputs"] or names_out != st["outputs"]:
                raise CheckpointError(f"{path}: its inputs {names_in} / outputs {names_out} differ from the "
                                      f"manifest's {st['inputs']} / {st['outputs']}")
            sessions.append(s)
        self.sessions = sessions
        self.device = kind
        return self

    def set_threads(self, threads: Optional[int]) -> "OnnxDVT":
        """ONNX Runtime intra-op threads (``None``: its default); the sessions are made anew."""
        self.threads = threads
        return self.to_device(self.device)

    def _run_graph(self, index: int, feeds: dict) -> list:
        # every output, in the graph's order (checked against the manifest's on load)
        return self.sessions[index].run(None, feeds)


def check_external_data(path: Path, directory: Path) -> None:
    """ManifestError for a graph whose tensors name external data outside ``directory`` (absolute, ``..``, a
    link leading out): ONNX Runtime would read whatever file the graph names. Read without the data itself;
    without the onnx package, a graph that has external data at all is refused (it cannot be checked)."""
    from dvt_core import schema
    from dvt_core.errors import ManifestError

    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data
    except ImportError:
        if b"location" in path.read_bytes():
            raise ManifestError(f"{path}: a graph with external data cannot be checked without the onnx "
                                "package (pip install 'dvt[onnx]')") from None
        return
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises protobuf's DecodeError and its own types
        raise ManifestError(f"{path}: not a readable ONNX graph ({str(exc).splitlines()[0][:160]})") from None
    for tensor in _get_all_tensors(graph):
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            schema.resolve_inside(directory, info.get("location"), f"{path.name}: tensor {tensor.name[:60]!r} "
                                                                    "external data")


class OnnxRuntime(GraphRuntimeBase):
    """ONNX graphs on ONNX Runtime (fp32: its CPU provider has no bf16 kernels for these graphs)."""

    name = "onnx"
    graph_format = "onnx"
    precisions_why = "its CPU provider has no bf16 kernels for these graphs; OpenVINO runs them in bf16"

    def device_for(self, device) -> str:
        """ONNX Runtime's execution provider for ``device`` (cpu, cuda); InputError for one it lacks here."""
        kind = str(device or "cpu").split(":")[0].lower()
        if kind not in PROVIDERS:
            raise InputError(f"unknown ONNX Runtime device {device!r}; use cpu or cuda")
        provider = PROVIDERS[kind]
        if provider not in ort.get_available_providers():
            raise InputError(f"device {device!r} asked for, but this onnxruntime has no {provider}")
        return provider

    def open(self, directory: Union[str, Path], model: Optional[str] = None, device: str = "cpu",
             precision: str = "fp32", threads: Optional[int] = None) -> OnnxDVT:
        self.check_precision(precision)
        manifest = read_manifest(directory, fmt="onnx", model=model)
        return OnnxDVT(directory, manifest, device=device, threads=threads)


RUNTIME = OnnxRuntime()
