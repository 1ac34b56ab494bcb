"""Starting a training run from another model's weights (``dvt train --init FILE``), framework-free.

Every tensor of the source whose canonical name and shape fit the target is taken as is. Where they
differ only in ways a transfer is expected to change, the tensor is adapted:

* a classification head (``stages.<i>.head.*``) of another class count keeps the target's fresh
  initialisation (re-initialised);
* a learned position embedding of another token grid is resampled bicubically over the grid, its
  class-token row kept (what timm does when a ViT is loaded at another image size);
* a fixed sinusoid position table of another length is recomputed (the target's own table);
* a patch-embedding kernel of another size is resampled with FlexiViT's pseudo-inverse resize (the
  kernel whose response to a resized patch equals the old kernel's response to the original patch),
  and one of another input-channel count is summed (to grey) or repeated and rescaled (from grey),
  as timm adapts input convolutions.

Anything else (a missing, unexpected or otherwise mismatched tensor) is refused with the three lists.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from dvt_core.errors import ArgumentError, CheckpointError, list_problems

HEAD = re.compile(r"^stages\.\d+\.head\.(weight|bias)$")
POS_EMBED = re.compile(r"^stages\.(\d+)\.pos_embed$")
PATCH_KERNEL = re.compile(r"^stages\.(\d+)\.tokenizer\.proj\.weight$")

BICUBIC_A = -0.75  # the cubic-convolution constant of torch's and PIL's bicubic resize


@dataclass
class TransferReport:
    """What an ``--init`` load did to each tensor of the target (canonical names)."""

    source: str
    loaded: list = field(default_factory=list)
    reinitialised: list = field(default_factory=list)  # "name (reason)"
    resampled: list = field(default_factory=list)  # "name old_shape -> new_shape (how)"

    def to_meta(self) -> dict:
        return {"file": self.source, "loaded": len(self.loaded), "reinitialised": list(self.reinitialised),
                "resampled": list(self.resampled)}

    def lines(self) -> list[str]:
        out = [f"--init {self.source}: {len(self.loaded)} tensors loaded as they are"]
        out += [f"  re-initialised {r}" for r in self.reinitialised]
        out += [f"  resampled {r}" for r in self.resampled]
        return out


# ---- resampling ------------------------------------------------------------------------------------------

def _cubic(t: float) -> float:
    a, t = BICUBIC_A, abs(t)
    if t <= 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0


def bicubic_matrix(old: int, new: int) -> np.ndarray:
    """``(new, old)`` per-axis matrix of bicubic resizing (half-pixel centres, edge samples repeated):
    the map of ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``."""
    if old < 1 or new < 1:
        raise ArgumentError(f"sizes must be positive, got {old} -> {new}")
    m = np.zeros((new, old), dtype=np.float64)
    scale = old / new
    for i in range(new):
        src = (i + 0.5) * scale - 0.5
        base = math.floor(src)
        frac = src - base
        for k in range(-1, 3):
            m[i, min(max(base + k, 0), old - 1)] += _cubic(k - frac)
    return m


def resample_pos_embed(pos: np.ndarray, new_grid: int) -> np.ndarray:
    """``(1, 1 + g*g, D)`` learned position embedding -> ``(1, 1 + new_grid**2, D)``: the class-token row
    kept, the grid rows resized bicubically."""
    n = pos.shape[1] - 1
    old = int(round(math.sqrt(n)))
    if pos.ndim != 3 or pos.shape[0] != 1 or old * old != n:
        raise ArgumentError(f"not a class token plus a square grid of positions: shape {pos.shape}")
    r = bicubic_matrix(old, new_grid)
    grid = pos[0, 1:].astype(np.float64).reshape(old, old, -1)
    grid = np.einsum("ia,jb,abd->ijd", r, r, grid).reshape(new_grid * new_grid, -1)
    return np.concatenate([pos[0, :1], grid.astype(pos.dtype)])[None]


def resample_patch_kernel(weight: np.ndarray, new_size: int) -> np.ndarray:
    """``(D, C, k, k)`` patch-embedding kernel -> ``(D, C, new_size, new_size)`` by FlexiViT's
    pseudo-inverse resize: with ``B`` the bicubic resize of a ``k x k`` patch to the new size, the new
    kernel ``w'`` solves ``B^T w' = w`` in the least-squares sense, so ``<w', B x> = <w, x>`` for every
    patch ``x`` when the kernel grows (exactly) and as nearly as possible when it shrinks."""
    d, c, k, k2 = weight.shape
    if k != k2:
        raise ArgumentError(f"not a square kernel: shape {weight.shape}")
    r = bicubic_matrix(k, new_size)
    b = np.kron(r, r)  # (new*new, k*k): resize of a row-major flattened patch
    pinv = np.linalg.pinv(b.T)  # (new*new, k*k)
    flat = weight.astype(np.float64).reshape(d * c, k * k)
    return (flat @ pinv.T).reshape(d, c, new_size, new_size).astype(weight.dtype)


def adapt_in_chans(weight: np.ndarray, in_chans: int) -> np.ndarray:
    """``(D, C, k, k)`` kernel for ``in_chans`` input channels: summed over channels for grey input from an
    RGB kernel; otherwise repeated over the new channels and rescaled by ``C / in_chans`` so the response
    to an image of equal channels is kept."""
    c = weight.shape[1]
    if c == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(axis=1, keepdims=True)
    reps = -(-in_chans // c)
    return (np.tile(weight, (1, reps, 1, 1))[:, :in_chans] * (c / in_chans)).astype(weight.dtype)


# ---- the load -----------------------------------------------------------------------------------------------

def _shape(a) -> tuple:
    return tuple(int(s) for s in np.shape(a))


def transfer_state(source: dict, target: dict, spec, source_name: str = "the --init file",
                   ) -> tuple[dict, TransferReport]:
    """The state to start training ``spec`` from: ``target`` (the freshly initialised model's state,
    canonical names) with every fitting tensor of ``source`` loaded and the others adapted as the module
    docstring says. Raises CheckpointError listing missing, unexpected and mismatched tensors when
    anything else differs."""
    report = TransferReport(source=source_name)
    out = {}
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    mismatched = []
    for name, fresh in target.items():
        if name not in source:
            continue
        src = np.asarray(source[name])
        want, have = _shape(fresh), _shape(src)
        if want == have:
            out[name] = src.astype(np.asarray(fresh).dtype, copy=False)
            report.loaded.append(name)
            continue
        stage_pos = POS_EMBED.match(name)
        stage_kernel = PATCH_KERNEL.match(name)
        if HEAD.match(name) and len(want) == len(have) and want[1:] == have[1:]:
            out[name] = fresh
            report.reinitialised.append(f"{name} ({have[0]} -> {want[0]} classes)")
        elif stage_pos and len(want) == len(have) == 3 and want[2] == have[2]:
            st = spec.stages[int(stage_pos.group(1))]
            if st.pos_embed == "sinusoid":
                out[name] = fresh
                report.reinitialised.append(f"{name} (fixed sinusoid table recomputed for {st.grid}x{st.grid} "
                                            "tokens)")
            else:
                try:
                    out[name] = resample_pos_embed(src, st.grid).astype(np.asarray(fresh).dtype)
                except ValueError:
                    mismatched.append(f"{name} {have} vs {want}")
                    continue
                report.resampled.append(f"{name} {have} -> {want} (bicubic over the token grid)")
        elif stage_kernel and len(want) == len(have) == 4 and want[0] == have[0] and want[2] == want[3] \
                and have[2] == have[3]:
            w, how = src, []
            if have[2] != want[2]:
                w = resample_patch_kernel(w, want[2])
                how.append("pseudo-inverse resize")
            if have[1] != want[1]:
                w = adapt_in_chans(w, want[1])
                how.append(f"{have[1]} -> {want[1]} input channels")
            out[name] = w.astype(np.asarray(fresh).dtype)
            report.resampled.append(f"{name} {have} -> {want} ({', '.join(how)})")
        else:
            mismatched.append(f"{name} {have} vs {want}")
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{source_name} does not fit {spec.name}: "
                              + list_problems(missing, unexpected, mismatched), missing, unexpected, mismatched)
    return out, report


def load_init(path, spec, target: dict) -> tuple[dict, TransferReport]:
    """:func:`transfer_state` from a checkpoint file in any format ``build`` reads."""
    from dvt_core.checkpoint.files import read_checkpoint

    ckpt = read_checkpoint(path)
    meta_spec = (ckpt.meta or {}).get("spec")
    num_exits = len(meta_spec["stages"]) if isinstance(meta_spec, dict) and "stages" in meta_spec else spec.num_exits
    return transfer_state(ckpt.canonical_state(num_exits), target, spec, source_name=str(path))


def no_weight_decay(name: str, ndim: int) -> bool:
    """timm's rule: norms, biases (every 0-d or 1-d tensor), position embeddings and class tokens get no
    weight decay."""
    return ndim <= 1 or name.endswith(("cls_token", "pos_embed"))


def param_groups(named_shapes, weight_decay: float) -> list[dict]:
    """``[{"names": [...], "weight_decay": wd}, {"names": [...], "weight_decay": 0.0}]`` over every
    trainable tensor ``(name, ndim)`` given, of every stage."""
    decay, no_decay = [], []
    for name, ndim in named_shapes:
        (no_decay if no_weight_decay(name, ndim) else decay).append(name)
    return [{"names": decay, "weight_decay": float(weight_decay)}, {"names": no_decay, "weight_decay": 0.0}]
