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
from dvt_core.checkpoint.metadata import META_RULES, check_checkpoint_meta
from dvt_core.checkpoint.registry import sha256
from dvt_core.errors import CheckpointError, InputError, ManifestError
from dvt_core.model.macs import exit_macs
from dvt_core.model.specs import check_spec_dict
from dvt_core.schema import HEX64_RE, MAX_JSON_BYTES, check_name, check_regular_file, read_json_file, resolve_inside, \
    show_value, want_dict, want_int, want_list, want_str

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
PT2_PRECISIONS = ("fp32", "bf16", "fp16")  # what a pt2 package is compiled in (its weights and arithmetic)
# the precisions each format writes (the manifest's "precision"; absent: fp32)
FORMAT_PRECISIONS = {"onnx": GRAPH_PRECISIONS, "pt2": PT2_PRECISIONS, "mindir": ("fp32",)}
EXPORT_PRECISIONS = tuple(dict.fromkeys(p for ps in FORMAT_PRECISIONS.values() for p in ps))
FEATURES, RELATIONS = "features", "relations"
PREV = "prev_"  # a graph's input for a carried tensor is named PREV + the output's name
# meta keys copied to the manifest's top level (what serving needs); the whole metadata is kept too
META_KEYS = ("thresholds", "budgets", "default_budget", "classes", "dataset", "cost_profile")


def sha256_of(path: Union[str, Path]) -> str:
    """SHA-256 of a regular file: :func:`dvt_core.checkpoint.registry.sha256`."""
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
    """The checked graph options of an ``fmt`` export, as the manifest records them; InputError for bad ones.
    ONNX: the resize form and the weights' precision; pt2: the precision the packages are compiled in."""
    if resize not in RESIZE_FORMS:
        raise InputError(f"unknown resize form {resize!r}; choose one of {', '.join(RESIZE_FORMS)}")
    if precision not in EXPORT_PRECISIONS:
        raise InputError(f"unknown export precision {precision!r}; choose one of {', '.join(EXPORT_PRECISIONS)}")
    offered = FORMAT_PRECISIONS.get(fmt, ("fp32",))
    if precision not in offered:
        raise InputError(f"{fmt} exports are written in {' or '.join(offered)}, not {precision}"
                         + ("" if fmt != "onnx" else " (bf16 is a runtime's choice: build(DIR, backend='openvino', "
                                                     "precision='bf16'))"))
    if fmt != "onnx" and resize != "auto":
        raise InputError(f"resize is an option of ONNX graphs; {fmt} graphs have one form")
    if fmt == "onnx":
        return {"resize": AUTO_RESIZE if resize == "auto" else resize, "precision": precision}
    return {"precision": precision} if fmt == "pt2" else {}


def manifest_precision(m: dict) -> str:
    """The precision an export's graphs were written in (a checked manifest; absent: fp32)."""
    return m.get("precision") or "fp32"


def stage_entry(index: int, file: str, inputs: list[str], outputs: list[str]) -> dict:
    return {"index": index, "file": file, "inputs": inputs, "outputs": outputs}



# ---- checking a manifest (untrusted input) ------------------------------------------------------------

def _check_stage_entry(st, i: int, directory: Path, where: str, expect_inputs: list, n_outputs: int) -> None:
    here = f"{where}: stages[{i}]"
    want_dict(st, here, ManifestError)
    if st.get("index", i) != i:
        raise ManifestError(f"{here}.index is {show_value(st.get('index'))}, not {i}")
    resolve_inside(directory, st.get("file"), f"{here}.file")
    sha = st.get("sha256")
    if not isinstance(sha, str) or not HEX64_RE.match(sha):
        raise ManifestError(f"{here}.sha256 is not a SHA-256 (64 lowercase hex digits): {show_value(sha)}")
    inputs = [want_str(x, f"{here}.inputs", 64, error=ManifestError)
              for x in want_list(st.get("inputs"), f"{here}.inputs", max_len=8, error=ManifestError)]
    outputs = [want_str(x, f"{here}.outputs", 64, error=ManifestError)
               for x in want_list(st.get("outputs"), f"{here}.outputs", max_len=8, error=ManifestError)]
    if inputs != expect_inputs:
        raise ManifestError(f"{here}.inputs is {inputs}; the spec needs {expect_inputs}")
    if len(outputs) != n_outputs:
        raise ManifestError(f"{here}.outputs names {len(outputs)} outputs; the spec needs {n_outputs}")


def check_manifest(m, directory, where: str, formats, kind: str, version: int) -> dict:
    """An export manifest (parsed ``dvt.json``) checked field by field against its own spec: the format,
    every stage's file (inside ``directory``), SHA-256, inputs and outputs, the exit MACs, thresholds,
    batch axes, class names and metadata. Returns ``m`` with ``m["_spec"]`` the validated spec."""
    directory = Path(directory)
    if not isinstance(m, dict) or m.get("format") != kind:
        raise InputError(f"{where} is not a dvt export manifest")
    if m.get("format_version") != version:
        raise ManifestError(f"{where}: manifest version {show_value(m.get('format_version'))} is not supported "
                            f"(this dvt reads {version})")
    if m.get("graph_format") not in formats:
        raise ManifestError(f"{where}: graph_format {show_value(m.get('graph_format'))} is not one of {', '.join(formats)}")
    check_name(m.get("model"), f"{where}: model", ManifestError)
    spec = check_spec_dict(m.get("spec"), f"{where}: spec", ManifestError)
    if spec.name != m["model"]:
        raise ManifestError(f"{where}: its spec is of {spec.name}, its model field says {m['model']}")
    n = spec.num_exits
    stages = want_list(m.get("stages"), f"{where}: stages", n, error=ManifestError)
    carried = []
    for i, st in enumerate(stages):
        expect = ["images"] + [PREV + c for c in carried]
        carried = carry_names(spec, i)
        _check_stage_entry(st, i, directory, where, expect, 1 + len(carried))
    for j, extra in enumerate(want_list(m.get("data_files") or [], f"{where}: data_files", max_len=1024,
                                        error=ManifestError)):
        want_dict(extra, f"{where}: data_files[{j}]", ManifestError)
        resolve_inside(directory, extra.get("file"), f"{where}: data_files[{j}].file")
        if not isinstance(extra.get("sha256"), str) or not HEX64_RE.match(extra["sha256"]):
            raise ManifestError(f"{where}: data_files[{j}].sha256 is not a SHA-256 (64 lowercase hex digits)")
    macs = [want_int(x, f"{where}: exit_macs[{i}]", 0, 1 << 62, ManifestError)
            for i, x in enumerate(want_list(m.get("exit_macs"), f"{where}: exit_macs", n, error=ManifestError))]
    if macs != [int(x) for x in exit_macs(spec)]:
        raise ManifestError(f"{where}: exit_macs {macs} are not the spec's {[int(x) for x in exit_macs(spec)]}")
    for key, want in (("img_size", spec.img_size), ("in_chans", spec.in_chans), ("num_classes", spec.num_classes),
                      ("mean", list(spec.mean)), ("std", list(spec.std))):
        if key in m and m[key] != want:
            raise ManifestError(f"{where}: {key} is {show_value(m[key])}, the spec says {want}")
    if "precision" in m and m["precision"] not in FORMAT_PRECISIONS[m["graph_format"]]:
        raise ManifestError(f"{where}: precision {show_value(m['precision'])} is not one {m['graph_format']} exports "
                            f"are written in ({', '.join(FORMAT_PRECISIONS[m['graph_format']])})")
    axes = want_dict(m.get("batch_axes") or {}, f"{where}: batch_axes", ManifestError)
    for key, axis in axes.items():
        if key not in (FEATURES, RELATIONS):
            raise ManifestError(f"{where}: batch_axes names {show_value(key)}, not {FEATURES} or {RELATIONS}")
        want_int(axis, f"{where}: batch_axes.{key}", 0, 1, ManifestError)
    meta = m.get("checkpoint_meta") or {}
    check_checkpoint_meta(meta, f"{where}: checkpoint_meta", ManifestError)
    top = {k: m.get(k) for k in META_RULES if m.get(k) is not None}
    check_checkpoint_meta({"spec": m["spec"], **top}, where, ManifestError)
    if m.get("classes") is not None and len(m["classes"]) != spec.num_classes:
        raise ManifestError(f"{where}: classes names {len(m['classes'])} classes, the spec has {spec.num_classes}")
    m["_spec"] = spec
    return m


def manifest_files(m: dict, directory) -> list[tuple[Path, str, str]]:
    """``(path, sha256, where)`` of every file an export reads (its graphs and their external data), each
    resolved inside ``directory`` (call after :func:`check_manifest`)."""
    out = [(resolve_inside(directory, st["file"], f"stages[{i}].file"), st["sha256"], f"stages[{i}]")
           for i, st in enumerate(m["stages"])]
    out += [(resolve_inside(directory, extra["file"], f"data_files[{j}].file"), extra["sha256"], f"data_files[{j}]")
            for j, extra in enumerate(m.get("data_files") or [])]
    return out


def check_no_unlisted_files(directory, listed, manifest_name: str) -> None:
    """ManifestError for a file in the export folder that the manifest does not cover with a hash (a graph's
    external data put beside it, a symbolic link): a runtime may read what sits beside a graph."""
    directory = Path(directory)
    covered = {Path(p).resolve() for p in listed} | {(directory / manifest_name).resolve()}
    for root, dirs, files in os.walk(directory):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = Path(root) / name
            if p.is_symlink() and p.resolve() not in covered:
                raise ManifestError(f"{directory}: {p.relative_to(directory)} is a symbolic link the manifest does "
                                    "not cover; refused")
            if p.resolve() not in covered:
                raise ManifestError(f"{directory}: {p.relative_to(directory)} is not covered by {manifest_name}'s "
                                    "SHA-256 list (a runtime could read it); refused")


# ---- reading an export --------------------------------------------------------------------------------


def read_manifest(directory: Union[str, Path], fmt: Optional[str] = None, model: Optional[str] = None,
                  verify: bool = True) -> dict:
    """The manifest of export ``directory``, checked as untrusted input (:func:`check_manifest`):
    size-capped before parsing, every field's type, range and length checked against its spec, every file
    it names resolved inside the folder; of format ``fmt`` and model ``model`` (if given); with ``verify``
    every file in the folder covered by its SHA-256 list (graphs and external data) and matching it."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"{d} is not a dvt export folder (not a directory); make one with `dvt export`")
    path = d / MANIFEST
    if not os.path.lexists(path):
        raise InputError(f"{d} is not a dvt export (no {MANIFEST}); make one with `dvt export`")
    if path.is_symlink():
        raise ManifestError(f"{path} is a symbolic link; an export's manifest is a file inside it")
    m = read_json_file(path, MANIFEST, ManifestError, MAX_JSON_BYTES)
    m = check_manifest(m, d, str(path), FORMATS, MANIFEST_KIND, MANIFEST_VERSION)
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
    files = manifest_files(manifest, directory)
    for g, want, where in files:
        if not g.is_file():
            raise ManifestError(f"{directory}: {where} {g.name} named in {MANIFEST} is missing")
        check_regular_file(g, f"{where} file", ManifestError)
        if sha256_of(g) != want:
            raise ManifestError(f"{g}: SHA-256 differs from {MANIFEST} (modified or corrupt file)")
    check_no_unlisted_files(directory, [g for g, _, _ in files], MANIFEST)


def rewrite_operating_points(directory: Union[str, Path], meta: dict) -> Path:
    """Store a new default operating point in export ``directory``: the manifest's ``thresholds``,
    ``budgets`` and ``default_budget`` and its ``checkpoint_meta`` become those of ``meta`` (a calibrated
    checkpoint's metadata, :func:`dvt_core.runtime.operating_point.calibrated_meta`). The export is checked
    first (every file against its SHA-256); the graphs and their hashes are kept and ``dvt.json`` is
    replaced atomically."""
    return _rewrite_meta(directory, meta, ("thresholds", "budgets", "default_budget"))


def rewrite_cost_profile(directory: Union[str, Path], profile: dict) -> Path:
    """Store a measured cost profile (:mod:`dvt_core.runtime.cost_model`) in export ``directory``: the
    manifest's ``cost_profile`` and its ``checkpoint_meta``'s, checked and written as
    :func:`rewrite_operating_points` writes."""
    meta = dict(read_manifest(directory, verify=False).get("checkpoint_meta") or {})
    meta["cost_profile"] = profile
    return _rewrite_meta(directory, meta, ("cost_profile",))


def _rewrite_meta(directory: Union[str, Path], meta: dict, keys: tuple) -> Path:
    """``dvt.json`` with ``checkpoint_meta`` replaced by ``meta`` and the top-level ``keys`` taken from it: the
    export checked first (every file against its SHA-256), the graphs and their hashes kept, the manifest
    replaced atomically and read back."""
    manifest = read_manifest(directory, verify=True)
    manifest.pop("_spec", None)
    meta = _plain(dict(meta))
    for key in keys:
        manifest[key] = meta.get(key)
    manifest["checkpoint_meta"] = meta
    path = Path(directory) / MANIFEST
    fileio.write_text(path, json.dumps(manifest, indent=1) + "\n", force=True)
    read_manifest(directory, verify=False)  # what was written reads back as a valid manifest
    return path
