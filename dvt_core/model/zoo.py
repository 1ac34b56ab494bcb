"""The model zoo: named cascade specs, ``list_models`` and ``get_spec``.

Entries reproduce the official DVT releases literally (grids, tokenizer geometry, LayerNorm eps).
Everything a user changes goes through :func:`get_spec`'s overrides, which re-validate.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Union

from dvt_core.errors import ArgumentError, SpecError
from dvt_core.model.specs import CascadeSpec, StageSpec, T2TSpec, apply_overrides

_REGISTRY: dict[str, Callable[[], CascadeSpec]] = {}


def register(fn: Callable[[], CascadeSpec], name: Optional[str] = None) -> Callable[[], CascadeSpec]:
    """Add the model that ``fn()`` describes to the zoo as ``name`` (``fn``'s own name by default)."""
    name = name or fn.__name__
    if name in _REGISTRY:
        raise SpecError(f"model {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models(pattern: str = "") -> list[str]:
    """Registered model names, sorted. ``pattern`` filters them: a shell-style wildcard as in timm
    (``"dvt_t2t*"``, ``"*_fashion_mnist_?x?"``, matched with :mod:`fnmatch`, case-sensitively) when it
    holds ``*``, ``?`` or ``[``; otherwise the names containing it."""
    import fnmatch

    if any(ch in pattern for ch in "*?["):
        return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))
    return sorted(n for n in _REGISTRY if pattern in n)


def get_spec(name_or_spec: Union[str, CascadeSpec], **overrides) -> CascadeSpec:
    """The spec of a zoo model (or a given spec) with ``overrides`` applied and validated."""
    if isinstance(name_or_spec, CascadeSpec):
        return apply_overrides(name_or_spec, **overrides)
    if not isinstance(name_or_spec, str):
        raise ArgumentError(f"expected a model name or a CascadeSpec, got {type(name_or_spec).__name__}")
    if name_or_spec not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name_or_spec, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list_models())}"
        raise SpecError(f"unknown model {name_or_spec!r}{hint}")
    return apply_overrides(_REGISTRY[name_or_spec](), **overrides)


# ---- T2T-ViT ----------------------------------------------------------------------------------
# The official DVT T2T-ViT exits: tokens-to-token first soft split (kernel, stride, padding) per grid.
_T2T_SPLITS_224 = {7: (14, 8, 3), 10: (11, 6, 5), 14: (7, 4, 2)}


def _t2t_stage(grid: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float) -> StageSpec:
    k, s, p = _T2T_SPLITS_224[grid]
    t2t = T2TSpec(kernels=(k, 3, 3), strides=(s, 2, 2), paddings=(p, 1, 1), token_dim=64, token_type="performer")
    return StageSpec(family="t2t", embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                     grid=grid, qkv_bias=False, ln_eps=1e-5, pos_embed="sinusoid", t2t=t2t)


def _dvt_t2t(name: str, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float) -> CascadeSpec:
    stages = tuple(_t2t_stage(g, embed_dim, depth, num_heads, mlp_ratio) for g in (7, 10, 14))
    return CascadeSpec(name=name, stages=stages)


# The official release's T2T-ViT widths by depth: embed_dim, depth, num_heads, mlp_ratio.
T2T_SIZES = {7: (256, 7, 4, 2.0), 10: (256, 10, 4, 2.0), 12: (256, 12, 4, 2.0), 14: (384, 14, 6, 3.0),
             19: (448, 19, 7, 3.0), 24: (512, 24, 8, 3.0)}
for _depth, _size in T2T_SIZES.items():
    register(functools.partial(_dvt_t2t, f"dvt_t2t_vit_{_depth}", *_size), f"dvt_t2t_vit_{_depth}")


# ---- ViT / DeiT ---------------------------------------------------------------------------------
# Official DVT DeiT exits at 224 px: patch (kernel = stride, padding) per grid.
_VIT_PATCHES_224 = {7: (32, 0), 10: (23, 3), 14: (16, 0)}


def _vit_stage(grid: int, embed_dim: int, depth: int, num_heads: int) -> StageSpec:
    k, p = _VIT_PATCHES_224[grid]
    return StageSpec(family="vit", embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0,
                     grid=grid, qkv_bias=True, ln_eps=1e-6, pos_embed="learned",
                     patch_kernel=k, patch_stride=k, patch_padding=p)


def _dvt_vit(name: str, embed_dim: int, depth: int, num_heads: int, grids=(7, 10, 14)) -> CascadeSpec:
    return CascadeSpec(name=name, stages=tuple(_vit_stage(g, embed_dim, depth, num_heads) for g in grids))


# DeiT widths: embed_dim, depth, num_heads.
DEIT_SIZES = {"dvt_deit_tiny": (192, 12, 3), "dvt_deit_small": (384, 12, 6), "dvt_deit_base": (768, 12, 12)}
for _name, _size in DEIT_SIZES.items():
    register(functools.partial(_dvt_vit, _name, *_size), _name)


@register
def dvt_vit_base():
    """ViT-B widths with two exits, 7x7 then 14x14 tokens, in the PyTorch release's numerics.

    Not a released model: neither release has a ViT-B DVT. The authors' MindSpore code at ViT-B width is
    ``get_spec("dvt_ms_deit_small", embed_dim=768, num_heads=12)``.
    """
    return _dvt_vit("dvt_vit_base", 768, 12, 12, grids=(7, 14))


# ---- the authors' MindSpore release -----------------------------------------------------------------
# One architecture: DeiT-S widths, exits at 7x7 (patch 32) and 14x14 (patch 16) tokens, 1001 classes,
# MindSpore's LayerNorm eps (1e-7), tanh GELU everywhere, and a feature-reuse LayerNorm whose output that
# code discards. Its ablations are ``feature_reuse=False`` / ``relation_reuse=False``; other widths go
# through overrides (every dependent width follows from embed_dim, num_heads and depth).
MS_RELEASE_LN_EPS = 1e-7
MS_RELEASE_CLASSES = 1001


@register
def dvt_ms_deit_small():
    """The authors' MindSpore DVT: DeiT-S widths, exits 7x7 and 14x14, feature and relationship reuse."""
    stages = tuple(dataclasses.replace(_vit_stage(g, 384, 12, 6), ln_eps=MS_RELEASE_LN_EPS) for g in (7, 14))
    return CascadeSpec(name="dvt_ms_deit_small", stages=stages, num_classes=MS_RELEASE_CLASSES, gelu="tanh",
                       feature_reuse_norm="discard")


def static_spec(spec: CascadeSpec, exit_index: int, name: str | None = None) -> CascadeSpec:
    """A single-exit (static) model made of one stage of ``spec``: the baseline at that grid."""
    st = spec.stages[exit_index]
    return dataclasses.replace(spec, name=name or f"{spec.name}_static_{st.grid}x{st.grid}", stages=(st,),
                               feature_reuse=False, relation_reuse=False).validate()


# ---- Fashion-MNIST (28x28 grey) -------------------------------------------------------------------
# Exits at 2x2, 4x4 and 7x7 tokens (patches of 14, 7 and 4 pixels). A small ViT: the data set is
# 28x28, and every stage keeps the same heads x depth so relation reuse applies between all of them.
# Feature reuse keeps the paper's proportions scaled to the width (16 reused channels of 64).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
FASHION_MNIST_GRIDS = (2, 4, 7)


def _fashion_stage(grid: int) -> StageSpec:
    k = 28 // grid
    return StageSpec(family="vit", embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0, grid=grid, qkv_bias=True,
                     ln_eps=1e-6, pos_embed="learned", patch_kernel=k, patch_stride=k, patch_padding=0)


@register
def dvt_fashion_mnist():
    """DVT for Fashion-MNIST: three exits (2x2, 4x4, 7x7 tokens) with feature and relation reuse."""
    return CascadeSpec(name="dvt_fashion_mnist", stages=tuple(_fashion_stage(g) for g in FASHION_MNIST_GRIDS),
                       num_classes=10, img_size=28, in_chans=1, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                       feature_reuse_dim=16, feature_reuse_hidden=64, drop_path_rate=0.1)


def _static_fashion(grid: int) -> CascadeSpec:
    return static_spec(dvt_fashion_mnist(), FASHION_MNIST_GRIDS.index(grid), name=f"static_fashion_mnist_{grid}x{grid}")


# The static single-exit baselines: the Fashion-MNIST backbone at each grid of its exits.
for _grid in FASHION_MNIST_GRIDS:
    register(functools.partial(_static_fashion, _grid), f"static_fashion_mnist_{_grid}x{_grid}")
