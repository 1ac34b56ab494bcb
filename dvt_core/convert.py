"""Checkpoint conversion between the official release, torch, safetensors and MindSpore.

The tensors are checked against the architecture before anything is written (missing, unexpected
and mismatched keys are listed), the metadata travels along (architecture and spec, per-exit MACs,
thresholds, accuracies, the official release's own fields), and the output is written atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import fileio
from .checkpoints import check_values, format_for_suffix, read_checkpoint, write_checkpoint
from .errors import CheckpointError
from .shapes import check_spec_state


def convert(src, dst, arch: Optional[str] = None, to: Optional[str] = None, force: bool = False,
            overrides: Optional[dict] = None, allow_lossy_cast: bool = False) -> dict:
    """Convert ``src`` to ``dst``; returns a summary (path, format, arch, tensor count)."""
    from .builder import resolve_spec
    from .macs import exit_macs

    dst = fileio.check_writable(dst, force=force, parents=True)
    fmt = to or format_for_suffix(dst)
    ckpt = read_checkpoint(src)
    if arch is None and "spec" not in ckpt.meta:
        raise CheckpointError(f"{src} does not say which model it holds; pass --arch NAME")
    spec = resolve_spec(arch, ckpt, **(overrides or {}))
    state = ckpt.canonical_state(spec.num_exits)
    check_spec_state(spec, state, str(src))  # names and shapes from the spec: no model is allocated
    state, _ = check_values(state, str(src), allow_lossy=allow_lossy_cast)
    meta = dict(ckpt.meta)
    if ckpt.format == "official":
        meta = {"official": {k: v for k, v in ckpt.meta.items()}}
    meta.update({"arch": meta.get("arch", arch or spec.name), "spec": spec.to_dict(), "exit_macs": exit_macs(spec),
                 "converted_from": ckpt.format})
    write_checkpoint(dst, state, meta, fmt=fmt, force=force)
    return {"path": str(dst), "format": fmt, "arch": meta["arch"], "tensors": len(state)}
