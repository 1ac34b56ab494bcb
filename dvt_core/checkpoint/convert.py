"""Checkpoint conversion between the official releases, torch, safetensors and MindSpore.

The tensors are checked against the architecture before anything is written (missing, unexpected
and mismatched keys are listed), the metadata travels along (architecture and spec, per-exit MACs,
thresholds, accuracies, the official release's own fields), and the output is written atomically. ``to="mindspore-official"``
writes the layout of the authors' MindSpore code (its names and order, no metadata), for a spec that code
computes (:func:`ms_official_problems`).
"""
from __future__ import annotations

from typing import Optional

from dvt_core import fileio
from dvt_core.checkpoint.files import check_values, format_for_suffix, read_checkpoint, resolve_spec, write_checkpoint
from dvt_core.errors import CheckpointError
from dvt_core.model.shapes import check_spec_state


def ms_official_problems(spec) -> list[str]:
    """Why the authors' MindSpore code could not run ``spec`` (empty when it can).

    That code has two ViT exits of one width whose second grid doubles the first (a nearest 2x resize),
    patch embeddings without padding, q/k/v with bias, a learned position table, and fixed numerics:
    tanh GELU, LayerNorm eps 1e-7, the feature-reuse LayerNorm discarded.
    """
    out = []
    if spec.num_exits != 2:
        out.append(f"it has two exits, not {spec.num_exits}")
    for i, st in enumerate(spec.stages):
        if st.family != "vit" or st.patch_padding or st.patch_kernel != st.patch_stride:
            out.append(f"stage {i} must be a ViT with an unpadded, non-overlapping patch embedding")
        if not st.qkv_bias or st.pos_embed != "learned":
            out.append(f"stage {i} must have q/k/v biases and a learned position table")
        if st.ln_eps != 1e-7:
            out.append(f"stage {i}: its LayerNorm eps is 1e-7, not {st.ln_eps:g}")
    if spec.num_exits == 2:
        a, b = spec.stages
        if (a.embed_dim, a.depth, a.num_heads, a.mlp_ratio) != (b.embed_dim, b.depth, b.num_heads, b.mlp_ratio):
            out.append("both stages must have the same widths, depth and heads")
        if spec.feature_reuse and b.grid != 2 * a.grid:
            out.append(f"its feature reuse resizes a grid to twice its side, not {a.grid} -> {b.grid}")
    if spec.gelu != "tanh":
        out.append(f"its GELU is the tanh approximation, not {spec.gelu!r}")
    if spec.feature_reuse and spec.feature_reuse_norm != "discard":
        out.append("its feature-reuse LayerNorm output is discarded (feature_reuse_norm='discard')")
    if spec.relation_reuse and spec.relation_reuse_expand != 3:
        out.append("its relation-reuse MLP expands 3x")
    return out


def convert(src, dst, arch: Optional[str] = None, to: Optional[str] = None, force: bool = False,
            overrides: Optional[dict] = None, allow_lossy_cast: bool = False) -> dict:
    """Convert ``src`` to ``dst``; returns a summary (path, format, arch, tensor count)."""
    from dvt_core.model.macs import exit_macs

    dst = fileio.check_writable(dst, force=force, parents=True)
    fmt = to or format_for_suffix(dst)
    ckpt = read_checkpoint(src)
    if arch is None and "spec" not in ckpt.meta:
        raise CheckpointError(f"{src} does not say which model it holds; pass --arch NAME")
    spec = resolve_spec(arch, ckpt, **(overrides or {}))
    state = ckpt.canonical_state(spec.num_exits, spec.in_chans)
    check_spec_state(spec, state, str(src))  # names and shapes from the spec: no model is allocated
    state, _ = check_values(state, str(src), allow_lossy=allow_lossy_cast)
    if fmt == "mindspore-official" and ms_official_problems(spec):
        raise CheckpointError(f"{spec.name} is not a model the authors' MindSpore code computes: "
                              + "; ".join(ms_official_problems(spec)))
    meta = dict(ckpt.meta)
    if ckpt.format == "official":
        meta = {"official": {k: v for k, v in ckpt.meta.items()}}
    meta.update({"arch": meta.get("arch", arch or spec.name), "spec": spec.to_dict(), "exit_macs": exit_macs(spec),
                 "converted_from": ckpt.format})
    write_checkpoint(dst, state, meta, fmt=fmt, force=force)
    return {"path": str(dst), "format": fmt, "arch": meta["arch"], "tensors": len(state)}
