"""Tensors of dtypes numpy lacks or DVT weights never are: bfloat16 widened to float32 (exactly, marked so a
load lists the cast), the rest refused by name. Shared by every checkpoint reader (torch, safetensors,
MindSpore)."""
from __future__ import annotations

import numpy as np

from dvt_core.errors import CheckpointError


class WidenedArray(np.ndarray):
    """A float32 array read from a narrower float dtype numpy lacks (bfloat16): ``source_dtype`` names it,
    so the load lists the cast like the others."""

    source_dtype = "float32"


def widened(a: np.ndarray, source_dtype: str) -> np.ndarray:
    out = np.asarray(a, dtype=np.float32).view(WidenedArray)
    out.source_dtype = source_dtype
    return out


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) as float32, exactly (bfloat16 is float32's upper half)."""
    return widened((raw.astype(np.uint32) << 16).view(np.float32), "bfloat16")


def refuse_dtype(where: str, what: str):
    raise CheckpointError(f"{where} is {what}; DVT weights are real dense tensors (float32, float16, bfloat16, "
                          "float64): convert it to one first")
