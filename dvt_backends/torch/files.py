"""Torch checkpoint files for dvt_core.checkpoint.files: numpy in, numpy out.

Files are only ever read with ``torch.load(..., weights_only=True)``: the unpickler rebuilds tensors
and plain data, never arbitrary objects. dvt_core decides what a refusal means (unsafe or corrupt).
"""
from __future__ import annotations

import numpy as np
import torch


def _numpy_safe_globals():
    """numpy types a weights-only unpickler may rebuild (metadata of some releases): plain data, no code."""
    import numpy.core.multiarray as ma

    out = [ma._reconstruct, np.ndarray, np.dtype, ma.scalar]
    out += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool", "float16", "uint8")]
    return out


def _tensor_to_numpy(t, where: str):
    """A tensor as numpy: bfloat16 widened to float32 (lossless, marked so the load lists it); sparse,
    quantized, complex and float8 tensors refused by name (no DVT weight is one)."""
    from dvt_core.checkpoint.files import refuse_dtype, widened

    if t.layout != torch.strided:
        refuse_dtype(where, f"a sparse tensor ({str(t.layout).replace('torch.', '')})")
    if t.is_quantized:
        refuse_dtype(where, f"a quantized tensor ({str(t.dtype).replace('torch.', '')})")
    if t.is_complex():
        refuse_dtype(where, f"a complex tensor ({str(t.dtype).replace('torch.', '')})")
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return widened(t.float().numpy(), "bfloat16")
    try:
        return t.numpy()
    except (TypeError, RuntimeError):  # float8 and other dtypes numpy lacks
        refuse_dtype(where, f"dtype {str(t.dtype).replace('torch.', '')}")


def _to_numpy(obj, where: str = "tensor"):
    if torch.is_tensor(obj):
        return _tensor_to_numpy(obj, where)
    if isinstance(obj, dict):
        return {k: _to_numpy(v, f"tensor {str(k)[:80]!r}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v, where) for v in obj)
    return obj


def load(path):
    """The file's object with every tensor turned into a numpy array. Raises what torch.load raises."""
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        return _to_numpy(torch.load(path, map_location="cpu", weights_only=True))


def save(path, state: dict, entries: dict) -> None:
    """``{"state_dict": tensors, **entries}``, loadable by plain ``torch.load(weights_only=True)``."""
    sd = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    torch.save({"state_dict": sd, **entries}, str(path))
