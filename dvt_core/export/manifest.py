"""The manifest of an export folder (``dvt.json``): its names, how it is written, how it is read and checked.

See ``dvt_core.export`` for what the graphs and the carried tensors are.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Union

import numpy as np

from dvt_core.errors import CheckpointError, InputError

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


def stage_entry(index: int, file: str, inputs: list[str], outputs: list[str]) -> dict:
    return {"index": index, "file": file, "inputs": inputs, "outputs": outputs}



# ---- reading an export --------------------------------------------------------------------------------


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
