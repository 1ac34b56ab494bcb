"""Resampling plans for feature and relationship reuse, computed once from two token grids.

The official code moves a previous stage's token maps onto the next stage's grid with nearest
upsampling to an intermediate size followed by adaptive average pooling (7x7 -> 14x14 -> 10x10 and
10x10 -> 20x20 -> 14x14). Both operations are separable, fixed linear maps, so the whole resize is one
small ``(new_grid, old_grid)`` matrix per axis. Each new-grid row of it draws from at most two
old-grid rows, so on a token sequence (both axes at once) every new token is a weighted sum of at most
four old tokens: :func:`token_resize_taps` lists them (which source tokens, with which weights), and a
backend applies them as gathers and weighted sums, never as dense products (see README, "Performance").
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from dvt_core.errors import ArgumentError


def intermediate_size(old: int, new: int) -> int:
    """Size the official code upsamples to before pooling: twice the old grid (never below the new one).

    This reproduces the official constants (7 -> 14 -> 10, 10 -> 20 -> 14, and 7 -> 14 directly for the
    two-exit MindSpore release) and extends them to any pair of grids.
    """
    return max(2 * old, new)


def nearest_matrix(old: int, new: int) -> np.ndarray:
    """``(new, old)`` matrix of nearest-neighbour resizing (source index floor(i * old / new))."""
    m = np.zeros((new, old), dtype=np.float64)
    scale = old / new
    for i in range(new):
        m[i, min(int(math.floor(i * scale)), old - 1)] = 1.0
    return m


def adaptive_avg_matrix(old: int, new: int) -> np.ndarray:
    """``(new, old)`` matrix of adaptive average pooling (bins [floor(i*old/new), ceil((i+1)*old/new)))."""
    m = np.zeros((new, old), dtype=np.float64)
    for i in range(new):
        start = (i * old) // new
        end = -((-(i + 1) * old) // new)
        m[i, start:end] = 1.0 / (end - start)
    return m


@lru_cache(maxsize=None)
def _resize_matrix(old: int, new: int) -> np.ndarray:
    mid = intermediate_size(old, new)
    out = adaptive_avg_matrix(mid, new) @ nearest_matrix(old, mid)
    out.setflags(write=False)
    return out


def resize_matrix(old: int, new: int, dtype=np.float32) -> np.ndarray:
    """``(new, old)`` per-axis matrix of the reuse resize from an ``old`` to a ``new`` token grid."""
    if old < 1 or new < 1:
        raise ArgumentError(f"grids must be positive, got {old} -> {new}")
    return _resize_matrix(int(old), int(new)).astype(dtype)


@lru_cache(maxsize=None)
def _token_matrix(old: int, new: int, class_token: str) -> np.ndarray:
    r = _resize_matrix(old, new)
    grid = np.kron(r, r)  # row-major token order: (new*new, old*old)
    m = np.zeros((new * new + 1, old * old + 1))
    m[1:, 1:] = grid
    if class_token == "keep":
        m[0, 0] = 1.0
    m.setflags(write=False)
    return m


def token_resize_matrix(old: int, new: int, class_token: str = "keep", dtype=np.float32) -> np.ndarray:
    """``(new*new + 1, old*old + 1)`` matrix moving a token sequence (class token first) between grids.

    ``class_token="keep"`` carries the class token over unchanged (relation reuse: its row and column
    of the attention logits are kept apart from the resize); ``"zero"`` gives it a zero row (feature
    reuse: the official model appends zeros for the class token). The backends resize by its non-zero
    entries (:func:`token_resize_taps`); torch's relation reuse also multiplies by it where it leaves the
    reused logits factored.
    """
    if class_token not in ("keep", "zero"):
        raise ArgumentError(f"class_token must be 'keep' or 'zero', got {class_token!r}")
    if old < 1 or new < 1:
        raise ArgumentError(f"grids must be positive, got {old} -> {new}")
    return _token_matrix(int(old), int(new), class_token).astype(dtype)


class ResizeTaps(NamedTuple):
    """The non-zero entries of a token resize matrix, row by row (compressed sparse rows).

    New token ``i`` is ``sum(weights[k] * old[indices[k]] for k in range(indptr[i], indptr[i + 1]))``;
    a row with no entries (the class token under ``"zero"``) is zero. ``nnz`` weighted terms in all:
    the multiply-accumulates of one resize of one channel.
    """

    indptr: np.ndarray  # int64 (n_new + 1,)
    indices: np.ndarray  # int64 (nnz,), source token of each term
    weights: np.ndarray  # (nnz,), its weight
    n_old: int  # old tokens, class token included
    n_new: int  # new tokens, class token included

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])


@lru_cache(maxsize=None)
def _token_taps(old: int, new: int, class_token: str) -> tuple:
    m = _token_matrix(old, new, class_token)
    rows, cols = np.nonzero(m)  # row-major: grouped by new token, sources in increasing order
    indptr = np.zeros(m.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=m.shape[0]), out=indptr[1:])
    return indptr, cols.astype(np.int64), m[rows, cols], m.shape[1], m.shape[0]


def token_resize_taps(old: int, new: int, class_token: str = "keep", dtype=np.float32) -> ResizeTaps:
    """:func:`token_resize_matrix` as per-token source lists and weights (its non-zero entries only).

    For the official grids every new token reads 1, 2 or 4 old tokens (7 -> 10: 2.56 on average,
    10 -> 14: 2.47), against ``old*old + 1`` for a dense product: applied as gathers and weighted sums
    the resize costs well under 1 % of an exit's multiply-accumulates (see dvt_core.model.macs).
    """
    if class_token not in ("keep", "zero"):
        raise ArgumentError(f"class_token must be 'keep' or 'zero', got {class_token!r}")
    if old < 1 or new < 1:
        raise ArgumentError(f"grids must be positive, got {old} -> {new}")
    indptr, indices, weights, n_old, n_new = _token_taps(int(old), int(new), class_token)
    return ResizeTaps(indptr.copy(), indices.copy(), weights.astype(dtype), n_old, n_new)
