"""Export a DVT as one graph per stage, and the framework-neutral half of the runtimes that run them.

An early-exit cascade cannot be one static graph: graph conditionals branch on one scalar for the whole
batch, and a runtime cannot stop inside a graph. So each stage is its own graph: inputs ``images`` and
what the previous stage left for reuse, outputs the exit's ``logits`` and what the next stage reuses.
A small host loop (:func:`dvt_core.runtime.early_exit.run_adaptive`) passes only the unconfident images on.

Beside the graphs, ``dvt.json`` (the manifest) holds everything a server needs without the training
code: the spec, exit MACs, default thresholds and the budget table from the checkpoint's metadata, class
names, normalisation, library versions and the SHA-256 of every graph. An export is written into a
temporary folder that is renamed into place at the end, so a failed export leaves nothing behind.

Carried tensors (names are the graphs' input / output names):

Graph inputs for them are named ``prev_features`` and ``prev_relations``.

* ``features``: the stage's final tokens (pre-norm), (B, N, C), batch axis 0.
* ``relations``: the pre-softmax attention logits of every block, blocks concatenated over the channel
  axis (block ``j``'s heads are channels ``j*heads .. (j+1)*heads-1``), in the layout the exporting
  backend's next stage reads: (B, depth x heads, N, N) from torch, (depth x heads, B, N, N) from
  MindSpore. The manifest records each tensor's batch axis.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from dvt_core.errors import CheckpointError, InputError, check_images_shape

MANIFEST = "dvt.json"
MANIFEST_KIND = "dvt-export"
MANIFEST_VERSION = 1
FORMATS = ("onnx", "mindir")
SOURCE_BACKEND = {"onnx": "torch", "mindir": "mindspore"}  # which backend writes each format
DEFAULT_OPSET = 17
FEATURES, RELATIONS = "features", "relations"
PREV = "prev_"  # a graph's input for a carried tensor is named PREV + the output's name
# meta keys copied to the manifest's top level (what serving needs); the whole metadata is kept too
META_KEYS = ("thresholds", "budgets", "default_budget", "classes", "dataset")


def sha256_of(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def carry_names(spec, index: int) -> list[str]:
    """What stage ``index`` leaves for stage ``index + 1`` (empty after the last), in graph order."""
    if index >= spec.num_exits - 1:
        return []
    names = []
    if spec.uses_feature_reuse(index + 1):
        names.append(FEATURES)
    if spec.uses_relation_reuse(index + 1):
        names.append(RELATIONS)
    return names


def _plain(obj):
    """JSON-ready copy of checkpoint metadata (numpy scalars and arrays, tuples)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def make_manifest(spec, fmt: str, stages: list[dict], meta: dict, versions: dict, batch_axes: dict) -> dict:
    from dvt_core.model.macs import exit_macs

    meta = _plain(dict(meta or {}))
    out = {
        "format": MANIFEST_KIND, "format_version": MANIFEST_VERSION, "graph_format": fmt,
        "model": spec.name, "spec": spec.to_dict(), "exit_macs": [int(m) for m in exit_macs(spec)],
        "mean": list(spec.mean), "std": list(spec.std), "img_size": spec.img_size, "in_chans": spec.in_chans,
        "num_classes": spec.num_classes,
    }
    for key in META_KEYS:
        out[key] = meta.get(key)
    out.update({"versions": versions, "batch_axes": batch_axes, "stages": stages, "checkpoint_meta": meta})
    return out


def export(name_or_spec=None, weights=None, fmt: str = "onnx", out: Union[str, Path] = "export",
           force: bool = False, opset: int = DEFAULT_OPSET, **overrides) -> Path:
    """Export ``name_or_spec`` with ``weights`` (any checkpoint ``build`` reads) as per-stage graphs.

    ``fmt`` "onnx" traces the torch backend, "mindir" the MindSpore backend. Writes ``out`` atomically;
    an existing ``out`` is replaced only with ``force``. Returns ``out``.
    """
    from dvt_core.runtime.builder import build

    check_target(fmt, out, force)
    model = build(name_or_spec, backend=SOURCE_BACKEND[fmt], weights=weights, **overrides)
    return export_model(model, fmt, out, force=force, opset=opset)


def check_target(fmt: str, out: Union[str, Path], force: bool) -> None:
    """InputError for an unknown format, or an ``out`` that exists (without ``force``) or is no export."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} exists; pass --force (force=True) to replace it")
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"refusing to replace {out}: it is not a dvt export (no {MANIFEST}) and not empty")


def export_model(model, fmt: str, out: Union[str, Path], force: bool = False, opset: int = DEFAULT_OPSET) -> Path:
    """Export a built model (torch for "onnx", MindSpore for "mindir") into ``out``, atomically."""
    from dvt_core.runtime.contract import backend_of

    check_target(fmt, out, force)
    backend = SOURCE_BACKEND[fmt]
    if backend_of(model).NAME != backend:
        raise InputError(f"{fmt} graphs are exported from a {backend} model, not a {backend_of(model).NAME} one")
    writer = importlib_export(backend)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: the export gets the modes the umask says
        kwargs = {"opset": int(opset)} if fmt == "onnx" else {}
        stages, versions, batch_axes = writer.export_stages(model, tmp, **kwargs)
        for st in stages:
            st["sha256"] = sha256_of(tmp / st["file"])
        versions = {"dvt": _dvt_version(), **versions}
        manifest = make_manifest(model.spec, fmt, stages, getattr(model, "checkpoint_meta", {}), versions,
                                 batch_axes)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def importlib_export(backend: str):
    import importlib

    from dvt_core.runtime.builder import get_backend

    get_backend(backend)
    return importlib.import_module(f"dvt_backends.{backend}.export")


def _dvt_version() -> str:
    from dvt_core import __version__

    return __version__


# ---- reading an export --------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_export(path) -> bool:
    """Whether ``path`` is a folder holding a dvt export manifest."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def rewrite_operating_points(directory: Union[str, Path], meta: dict) -> Path:
    """Store a new default operating point in export ``directory``: the manifest's ``thresholds``,
    ``budgets`` and ``default_budget`` and its ``checkpoint_meta`` become those of ``meta`` (a calibrated
    checkpoint's metadata, :func:`dvt_core.runtime.operating_point.calibrated_meta`). The graphs and their
    SHA-256 are checked first and kept; ``dvt.json`` is replaced atomically."""
    from dvt_core import fileio

    manifest = read_manifest(directory, verify=True)
    manifest.pop("_spec", None)
    meta = _plain(dict(meta))
    for key in ("thresholds", "budgets", "default_budget"):
        manifest[key] = meta.get(key)
    manifest["checkpoint_meta"] = meta
    path = Path(directory) / MANIFEST
    fileio.write_text(path, json.dumps(manifest, indent=1) + "\n", force=True)
    return path


def read_manifest(directory: Union[str, Path], fmt: Optional[str] = None, model: Optional[str] = None,
                  verify: bool = True) -> dict:
    """The manifest of export ``directory``, checked: it is an export, of format ``fmt`` (if given), of
    model ``model`` (if given), and every graph's SHA-256 matches (if ``verify``)."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"{d} is not a dvt export folder (not a directory); make one with `dvt export`")
    path = d / MANIFEST
    if not path.is_file():
        raise InputError(f"{d} is not a dvt export (no {MANIFEST}); make one with `dvt export`")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable manifest ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_KIND or not isinstance(m.get("stages"), list):
        raise InputError(f"{path} is not a dvt export manifest")
    if m.get("format_version") != MANIFEST_VERSION:
        raise CheckpointError(f"{path}: manifest version {m.get('format_version')} is not supported "
                              f"(this dvt reads {MANIFEST_VERSION})")
    if fmt is not None and m.get("graph_format") != fmt:
        raise InputError(f"{d} holds {m.get('graph_format')} graphs, not {fmt}; "
                         f"use --backend {m.get('graph_format')} (backend={m.get('graph_format')!r})")
    if model is not None and model != m.get("model"):
        raise CheckpointError(f"{d} is an export of {m.get('model')}, not {model}")
    from dvt_core.model.specs import CascadeSpec

    try:
        spec = CascadeSpec.from_dict(m["spec"]).validate()
    except Exception as exc:  # noqa: BLE001 - any malformed spec is the manifest's fault
        raise CheckpointError(f"{path}: the spec it holds is invalid ({exc})") from None
    if spec.name != m.get("model") or len(m["stages"]) != spec.num_exits:
        raise CheckpointError(f"{path}: its spec ({spec.name}, {spec.num_exits} exits) does not match its model "
                              f"{m.get('model')} with {len(m['stages'])} graphs")
    if verify:
        for st in m["stages"]:
            g = d / str(st.get("file", ""))
            if not st.get("file") or not g.is_file():
                raise CheckpointError(f"{d}: graph {st.get('file')} named in {MANIFEST} is missing")
            if sha256_of(g) != st.get("sha256"):
                raise CheckpointError(f"{g}: SHA-256 differs from {MANIFEST} (modified or corrupt graph)")
    m["_spec"] = spec
    return m


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


class ExportedDVT:
    """A DVT served from exported per-stage graphs; same user API as the framework backends.

    ``model(images)`` returns the tuple of per-exit logits (numpy float32); ``model.adaptive(images,
    thresholds=None)`` runs true early exit through :func:`dvt_core.runtime.early_exit.run_adaptive`, with the
    manifest's default thresholds unless others are given. A runtime supplies ``_run_graph(index,
    feeds) -> list of numpy outputs`` (in the manifest's output order).
    """

    graph_format = ""

    def __init__(self, directory: Union[str, Path], manifest: dict):
        self.backend_name = self.graph_format
        self.directory = Path(directory)
        self.manifest = manifest
        self.spec = manifest["_spec"]
        self.exit_macs = list(manifest["exit_macs"])
        self.checkpoint_meta = dict(manifest.get("checkpoint_meta") or {})
        self.training = False

    # the contract's small operations ----------------------------------------------------------------
    def _run_graph(self, index: int, feeds: dict) -> list:
        raise NotImplementedError

    def run_stage(self, index: int, images, carry: Optional[dict] = None):
        """Logits of exit ``index`` and the carry for the next stage (a dict name -> array; None after the last)."""
        st = self.manifest["stages"][index]
        feeds = {"images": images}
        for name in st["inputs"][1:]:
            feeds[name] = carry[name[len(PREV):]]
        outs = self._run_graph(index, feeds)
        logits = outs[0]
        names = st["outputs"][1:]
        return logits, (Carry(zip(names, outs[1:]), self.manifest.get("batch_axes") or {}) if names else None)

    def select(self, images, carry, rows):
        return select_numpy(images, carry, rows)

    @staticmethod
    def to_numpy(tensor) -> np.ndarray:
        return np.asarray(tensor, dtype=np.float32)

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
        x = self._images(images)
        outputs, carry = [], None
        for i in range(self.spec.num_exits):
            logits, carry = self.run_stage(i, x, carry)
            outputs.append(self.to_numpy(logits))
        return tuple(outputs)

    forward = __call__

    def default_thresholds(self):
        t = self.manifest.get("thresholds")
        if t is None:
            raise InputError(f"{self.directory}'s manifest holds no default thresholds; pass thresholds")
        return t

    def adaptive(self, images, thresholds: Optional[Sequence[float]] = None, confidence: str = "max_softmax"):
        from dvt_core.runtime.early_exit import run_adaptive

        x = self._images(images)
        t = self.default_thresholds() if thresholds is None else thresholds
        return run_adaptive(self.run_stage, self.to_numpy, self.select, x, x.shape[0], t, self.exit_macs, confidence)

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


def stage_entry(index: int, file: str, inputs: list[str], outputs: list[str]) -> dict:
    return {"index": index, "file": file, "inputs": inputs, "outputs": outputs}


# ---- the backend contract of a runtime of exported graphs --------------------------------------------------
# An export runtime (dvt_backends/onnx, dvt_backends/mindir) is an ExportedDVT subclass plus these module-level
# members: the same for every runtime, since they only call the model's own methods. Building, state dicts
# and checkpoint files do not apply to fixed graphs and are refused by name.


def forward_numpy(model: ExportedDVT, images):
    """Per-exit logits of a float32 numpy batch, as numpy arrays."""
    return list(model(images))


def adaptive_numpy(model: ExportedDVT, images, thresholds, confidence: str = "max_softmax"):
    """``model.adaptive`` on a float32 numpy batch."""
    return model.adaptive(images, thresholds, confidence)


def to_device(model: ExportedDVT, device) -> ExportedDVT:
    return model.to_device(device)


def to_tensor(model: ExportedDVT, array):
    return model.to_tensor(array)


def run_stage(model: ExportedDVT, index: int, images, carry=None):
    return model.run_stage(index, images, carry)


def inference(model: ExportedDVT):
    """An export runs inference graphs only: nothing to switch (a context manager that does nothing)."""
    import contextlib

    return contextlib.nullcontext()


def join_with(concatenate: Callable):
    """The contract's ``join(parts)`` for a runtime whose arrays ``concatenate(values, axis)`` joins."""

    def join(parts):
        """Several ``(images, carry)`` batches of one stage as one, concatenated along the batch axes."""
        images = np.concatenate([np.asarray(p[0]) for p in parts])
        first = parts[0][1]
        carry = None if first is None else Carry(
            {k: concatenate([p[1][k] for p in parts], first.axes[k]) for k in first}, first.axes)
        return images, carry

    return join


def refusals(name: str) -> tuple[Callable, ...]:
    """``build_model, model_state, load_state, read_file, write_file`` of runtime ``name``: each refuses,
    saying what to do instead."""

    def build_model(spec):
        raise InputError(f"the {name} backend runs exported graphs: make them with `dvt export`, then "
                         f"dvt_core.build(DIR, backend={name!r})")

    def model_state(model):
        raise InputError(f"an exported {name} model has no editable state; export again from a checkpoint")

    def load_state(model, state, source: str = "checkpoint"):
        raise InputError(f"an exported {name} model's weights are fixed in its graphs; export again with new weights")

    def read_file(path):
        raise InputError(f"the {name} backend reads export folders, not checkpoint files ({path})")

    def write_file(path, state, entries):
        raise InputError(f"the {name} backend writes no checkpoints; use torch, safetensors or mindspore")

    return build_model, model_state, load_state, read_file, write_file
