"""``dvt export``: a built model written as one graph per stage plus its manifest, atomically.

The framework's own half (tracing a stage into ONNX or MindIR) is ``dvt_backends.<framework>.export``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from dvt_core import fileio
from dvt_core.errors import InputError
from dvt_core.runtime.contract import get_backend
from dvt_core.runtimes import import_runtime
from dvt_core.version import __version__
from dvt_core.export.manifest import (DEFAULT_OPSET, FORMATS, MANIFEST, SOURCE_BACKEND, SUPPORTED_OPSETS,  # noqa: F401
                                      graph_form, make_manifest, sha256_of)


# the framework module that writes each format's stages (AOTInductor imported only for pt2)
STAGE_MODULE = {"pt2": "export_pt2"}

def export(name_or_spec=None, weights=None, fmt: str = "onnx", out: Union[str, Path] = "export",
           force: bool = False, opset: int = DEFAULT_OPSET, resize: str = "auto", precision: str = "fp32",
           **overrides) -> Path:
    """Export ``name_or_spec`` with ``weights`` (any checkpoint ``build`` reads) as per-stage graphs.

    ``fmt`` "onnx" traces the torch backend, "pt2" compiles its stages with AOTInductor, "mindir" exports the
    MindSpore backend. Writes ``out`` atomically;
    an existing ``out`` is replaced only with ``force``. Returns ``out``. ONNX only: ``resize`` is the form
    of the reuse resize ("gather", "dense", or "auto": the one ONNX Runtime and OpenVINO run fastest).
    ``precision``: ONNX, what the weights are stored in ("fp32", or "fp16": half the size; runtimes compute in
    the precision they are asked for); pt2, what the packages are compiled and run in ("fp32", "bf16",
    "fp16"); MindIR, fp32. Both are recorded in the manifest.
    """
    from dvt_core.runtime.builder import build

    check_target(fmt, out, force, opset)
    graph_form(fmt, resize, precision)
    model = build(name_or_spec, backend=SOURCE_BACKEND[fmt], weights=weights, **overrides)
    return export_model(model, fmt, out, force=force, opset=opset, resize=resize, precision=precision)


def check_target(fmt: str, out: Union[str, Path], force: bool, opset: int = DEFAULT_OPSET) -> None:
    """InputError for an unknown format or opset, or an ``out`` that exists (without ``force``), is no export,
    or whose parent folder is missing (nothing is created silently)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if fileio.exists(out) and not force:
        raise InputError(f"{out} exists; pass --force (force=True) to replace it")
    if fileio.exists(out) and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"refusing to replace {out}: it is not a dvt export (no {MANIFEST}) and not empty")
    try:
        fileio.check_folder_target(out, force)
    except OSError as exc:
        raise InputError(str(exc)) from None
    if fmt == "onnx" and int(opset) not in SUPPORTED_OPSETS:
        raise InputError(f"ONNX opset {opset} is not one this export writes "
                         f"({SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1})")


def export_model(model, fmt: str, out: Union[str, Path], force: bool = False, opset: int = DEFAULT_OPSET,
                 resize: str = "auto", precision: str = "fp32") -> Path:
    """Export a built model (torch for "onnx", MindSpore for "mindir") into ``out``, atomically
    (``resize``, ``precision``: :func:`export`)."""
    from dvt_core.runtime.contract import backend_of

    check_target(fmt, out, force, opset)
    form = graph_form(fmt, resize, precision)
    backend = SOURCE_BACKEND[fmt]
    if backend_of(model).name != backend:
        raise InputError(f"{fmt} graphs are exported from a {backend} model, not a {backend_of(model).name} one")
    # looked up when called (a test patches it); the framework's module per format: torch writes two
    write_stages = importlib_export(backend, STAGE_MODULE.get(fmt, "export")).export_stages
    with fileio.atomic_dir(out, force=force) as tmp:  # removed on failure, SIGTERM and SIGINT alike
        kwargs = {"opset": int(opset), **form} if fmt == "onnx" else form  # pt2: the precision compiled in
        stages, versions, batch_axes = write_stages(model, tmp, **kwargs)
        for st in stages:
            st["sha256"] = sha256_of(tmp / st["file"])
        versions = {"dvt": __version__, **versions}
        manifest = make_manifest(model.spec, fmt, stages, getattr(model, "checkpoint_meta", {}), versions,
                                 batch_axes, form)
        manifest["data_files"] = _data_files(tmp, stages)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return Path(out)


def _data_files(folder: Path, stages: list) -> list[dict]:
    """Every file an exporter wrote beside the graphs (external weights), with its SHA-256: a reader
    verifies every file it may read."""
    graphs = {st["file"] for st in stages}
    return [{"file": p.relative_to(folder).as_posix(), "sha256": sha256_of(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() not in graphs]


def importlib_export(backend: str, module: str = "export"):
    """The ``export`` module (or ``module``) of framework ``backend``, reached through the runtime registry."""
    get_backend(backend)
    return import_runtime(backend, module)


def is_export(path) -> bool:
    """Whether ``path`` is a folder holding a dvt export manifest."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()
