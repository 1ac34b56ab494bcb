"""Per-stage AOTInductor packages (``stage{i}.pt2``) behind the DVT model API.

A package holds the stage compiled ahead of time for this CPU (native code and the frozen weights), so loading
it runs that code: the export folder is checked as every export is (manifest schema, every file inside the folder
and matching its SHA-256, no unlisted file) before any package is opened, and it must come from a source you
trust as you would trust a shared library. The carry between stages stays a torch tensor (no copy to numpy);
only each exit's logits are converted. A stage is called through the package loader's flat entry point: the
runner's own ``__call__`` parses its input and output tree specs from text at every call (about 80 of 650 us
of CPU time per batch-1 call of the shipped model's first stage, on the loaded AMX machine).

A package runs in the precision it was compiled in (the manifest's ``precision``: fp32, bf16 or fp16): float32
images go in, the carry stays in that dtype, the logits are converted to float32 here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from dvt_core.errors import CheckpointError, InputError
from dvt_core.export.graph import Carry, ExportedDVT, GraphRuntimeBase
from dvt_core.export.manifest import manifest_precision, read_manifest


class Pt2DVT(ExportedDVT):
    """A pt2 export: one loaded AOTInductor runner per stage, in the precision it was compiled in, CPU."""

    backend_name = "pt2"
    graph_format = "pt2"

    def __init__(self, directory, manifest: dict, threads: Optional[int] = None):
        super().__init__(directory, manifest)
        self.runners = []
        for st in manifest["stages"]:
            path = self.directory / st["file"]
            try:
                self.runners.append(torch._inductor.aoti_load_package(str(path)))
            except Exception as exc:  # noqa: BLE001 - the loader raises RuntimeError and zipfile's errors
                raise CheckpointError(f"{path}: not a loadable AOTInductor package "
                                      f"({str(exc).strip().splitlines()[0][:160]})") from None
        self.device = "cpu"
        self.precision = manifest_precision(manifest)
        if threads is not None:
            self.set_threads(threads)

    def to_device(self, device) -> "Pt2DVT":
        RUNTIME.device_for(device)
        return self

    def set_threads(self, threads: int) -> "Pt2DVT":
        """The compiled code's threads (OpenMP, shared with torch: process-wide)."""
        torch.set_num_threads(int(threads))
        return self

    def to_tensor(self, array) -> torch.Tensor:
        return torch.from_numpy(self._images(array))

    def _run_graph(self, index: int, feeds: dict) -> list:
        names = self.manifest["stages"][index]["inputs"]
        runner = self.runners[index]
        with torch.no_grad():
            loader = getattr(runner, "loader", None)
            if loader is not None:  # the flat call: inputs and outputs are flat tensors in the manifest's order
                return list(loader.boxed_run([feeds[n] for n in names]))
            out = runner(*(feeds[n] for n in names))
        return list(out) if isinstance(out, (list, tuple)) else [out]


class Pt2Runtime(GraphRuntimeBase):
    """AOTInductor packages on the CPU, each export in the one precision it was compiled in."""

    runs_native_code = True  # build() opens it only with trust_native_code=True

    name = "pt2"
    graph_format = "pt2"
    precisions = ("fp32", "bf16", "fp16")  # what packages can be compiled in; a folder runs only its own
    precisions_why = "a package is compiled in the precision it was exported in (dvt export --format pt2 --precision)"

    def device_for(self, device) -> str:
        kind = str(device or "cpu").split(":")[0].lower()
        if kind != "cpu":
            raise InputError(f"the pt2 runtime runs packages compiled for the CPU, not on {device!r}")
        return kind

    def to_numpy(self, tensor) -> np.ndarray:
        return tensor.float().numpy() if torch.is_tensor(tensor) else np.asarray(tensor, dtype=np.float32)

    def select(self, images, carry, rows):
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        picked = None if carry is None else Carry({k: v.index_select(carry.axes[k], idx) for k, v in carry.items()},
                                                  carry.axes)
        return images.index_select(0, idx), picked

    def concatenate(self, values, axis: int):
        return torch.cat([v if torch.is_tensor(v) else torch.from_numpy(np.asarray(v)) for v in values], dim=axis)

    def join(self, parts):
        first = parts[0][1]
        carry = None if first is None else Carry(
            {k: torch.cat([p[1][k] for p in parts], dim=first.axes[k]) for k in first}, first.axes)
        return self.concatenate([p[0] for p in parts], 0), carry

    def folder_precision(self, directory: Union[str, Path]) -> str:
        """The precision the packages in ``directory`` were compiled in (what ``build`` opens them in when no
        precision is named)."""
        return manifest_precision(read_manifest(directory, fmt="pt2", verify=False))

    def open(self, directory: Union[str, Path], model: Optional[str] = None, device: str = "cpu",
             precision: str = "fp32", threads: Optional[int] = None) -> Pt2DVT:
        """The packages in ``directory``, which run only in the precision they were compiled in: another
        ``precision`` is refused, naming both."""
        self.check_precision(precision)
        self.device_for(device)
        manifest = read_manifest(directory, fmt="pt2", model=model)  # every file checked before any is loaded
        compiled = manifest_precision(manifest)
        if precision != compiled:
            raise InputError(f"{directory}: its pt2 packages were compiled in {compiled}, not {precision}; run them "
                             f"in {compiled} (precision={compiled!r}, --precision {compiled}) or export again with "
                             f"--precision {precision}")
        return Pt2DVT(directory, manifest, threads=threads)


RUNTIME = Pt2Runtime()
