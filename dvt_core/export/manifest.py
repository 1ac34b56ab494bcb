"""The manifest of an export folder (``dvt.json``): its names, how it is written, how it is read and checked.

See ``dvt_core.export`` for what the graphs and the carried tensors are.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from dvt_core import fileio
from dvt_core.errors import CheckpointError, InputError

MANIFEST = "dvt.json"
MANIFEST_KIND = "dvt-export"
MANIFEST_VERSION = 1
FORMATS = ("onnx", "mindir", "pt2")
SOURCE_BACKEND = {"onnx": "torch", "mindir": "mindspore", "pt2": "torch"}  # which backend writes each format
DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(14, 22)  # scaled_dot_product_attention needs 14; each of 14..21 exported and run in ORT
# ONNX graph forms (dvt_backends.torch.export): the reuse resize as "gather" (its taps: Gather, Mul, ReduceSum)
# or "dense" (one MatMul by its constant matrix); "auto" is the one ONNX Runtime and OpenVINO run fastest
# (docs/deploy.md has the profiles)
RESIZE_FORMS = ("gather", "dense", "auto")
AUTO_RESIZE = "dense"
GRAPH_PRECISIONS = ("fp32", "fp16")  # what ONNX graphs store their weights in
FEATURES, RELATIONS = "features", "relations"
PREV = "prev_"  # a graph's input for a carried tensor is named PREV + the output's name
# meta keys copied to the manifest's top level (what serving needs); the whole metadata is kept too
META_KEYS = ("thresholds", "budgets", "default_budget", "classes", "dataset")


def sha256_of(path: Union[str, Path]) -> str:
    """SHA-256 of a regular file: :func:`dvt_core.checkpoint.registry.sha256`."""
    from dvt_core.checkpoint.registry import sha256

    return sha256(path)


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


def make_manifest(spec, fmt: str, stages: list[dict], meta: dict, versions: dict, batch_axes: dict,
                  graph_form: Optional[dict] = None) -> dict:
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
    out.update(graph_form or {})  # how the graphs were written: the resize form, the weights' precision
    return out


def graph_form(fmt: str, resize: str = "auto", precision: str = "fp32") -> dict:
    """The checked graph options of an ``fmt`` export, as the manifest records them; InputError for bad ones."""
    if resize not in RESIZE_FORMS:
        raise InputError(f"unknown resize form {resize!r}; choose one of {', '.join(RESIZE_FORMS)}")
    if precision not in GRAPH_PRECISIONS:
        raise InputError(f"unknown graph precision {precision!r}; choose one of {', '.join(GRAPH_PRECISIONS)}")
    if fmt != "onnx":
        if resize != "auto" or precision != "fp32":
            raise InputError(f"resize and precision are options of ONNX graphs; {fmt} graphs have one form")
        return {}
    return {"resize": AUTO_RESIZE if resize == "auto" else resize, "precision": precision}


def stage_entry(index: int, file: str, inputs: list[str], outputs: list[str]) -> dict:
    return {"index": index, "file": file, "inputs": inputs, "outputs": outputs}



# ---- reading an export --------------------------------------------------------------------------------


def read_manifest(directory: Union[str, Path], fmt: Optional[str] = None, model: Optional[str] = None,
                  verify: bool = True) -> dict:
    """The manifest of export ``directory``, checked as untrusted input (:func:`dvt_core.schema.check_manifest`):
    size-capped before parsing, every field's type, range and length checked against its spec, every file
    it names resolved inside the folder; of format ``fmt`` and model ``model`` (if given); with ``verify``
    every file in the folder covered by its SHA-256 list (graphs and external data) and matching it."""
    from dvt_core import schema
    from dvt_core.errors import ManifestError

    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"{d} is not a dvt export folder (not a directory); make one with `dvt export`")
    path = d / MANIFEST
    if not os.path.lexists(path):
        raise InputError(f"{d} is not a dvt export (no {MANIFEST}); make one with `dvt export`")
    if path.is_symlink():
        raise ManifestError(f"{path} is a symbolic link; an export's manifest is a file inside it")
    m = schema.read_json_file(path, MANIFEST, ManifestError, schema.MAX_JSON_BYTES)
    m = schema.check_manifest(m, d, str(path), FORMATS, MANIFEST_KIND, MANIFEST_VERSION)
    if fmt is not None and m.get("graph_format") != fmt:
        raise InputError(f"{d} holds {m.get('graph_format')} graphs, not {fmt}; "
                         f"use --backend {m.get('graph_format')} (backend={m.get('graph_format')!r})")
    if model is not None and model != m.get("model"):
        raise CheckpointError(f"{d} is an export of {m.get('model')}, not {model}")
    if verify:
        verify_files(m, d)
    return m


def verify_files(manifest: dict, directory: Union[str, Path]) -> None:
    """ManifestError unless every file the export reads is a regular file inside ``directory`` matching its
    SHA-256, and no file the manifest does not cover sits in the folder."""
    from dvt_core import schema
    from dvt_core.errors import ManifestError

    files = schema.manifest_files(manifest, directory)
    for g, want, where in files:
        if not g.is_file():
            raise ManifestError(f"{directory}: {where} {g.name} named in {MANIFEST} is missing")
        schema.check_regular_file(g, f"{where} file", ManifestError)
        if sha256_of(g) != want:
            raise ManifestError(f"{g}: SHA-256 differs from {MANIFEST} (modified or corrupt file)")
    schema.check_no_unlisted_files(directory, [g for g, _, _ in files], MANIFEST)


def rewrite_operating_points(directory: Union[str, Path], meta: dict) -> Path:
    """Store a new default operating point in export ``directory``: the manifest's ``thresholds``,
    ``budgets`` and ``default_budget`` and its ``checkpoint_meta`` become those of ``meta`` (a calibrated
    checkpoint's metadata, :func:`dvt_core.runtime.operating_point.calibrated_meta`). The export is checked
    first (every file against its SHA-256); the graphs and their hashes are kept and ``dvt.json`` is
    replaced atomically."""
    manifest = read_manifest(directory, verify=True)
    manifest.pop("_spec", None)
    meta = _plain(dict(meta))
    for key in ("thresholds", "budgets", "default_budget"):
        manifest[key] = meta.get(key)
    manifest["checkpoint_meta"] = meta
    path = Path(directory) / MANIFEST
    fileio.write_text(path, json.dumps(manifest, indent=1) + "\n", force=True)
    read_manifest(directory, verify=False)  # what was written reads back as a valid manifest
    return path
