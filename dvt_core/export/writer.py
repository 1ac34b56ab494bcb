"""``dvt export``: a built model written as one graph per stage plus its manifest, atomically.

The framework's own half (tracing a stage into ONNX or MindIR) is ``dvt_backends.<framework>.export``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

from dvt_core.errors import InputError
from dvt_core.export.manifest import (DEFAULT_OPSET, FORMATS, MANIFEST, SOURCE_BACKEND, make_manifest,  # noqa: F401
                                      sha256_of)

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
    if backend_of(model).name != backend:
        raise InputError(f"{fmt} graphs are exported from a {backend} model, not a {backend_of(model).name} one")
    writer = importlib_export(backend)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
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
