"""Moving numpy state dicts (canonical names) in and out of a torch DVT, strictly."""
from __future__ import annotations

import numpy as np
import torch

from dvt_core.model.shapes import check_state


def model_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter and persistent buffer as float32 numpy arrays, canonical names (a bf16 / fp16
    model's too: numpy has no bfloat16)."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().numpy().copy()
            for k, v in model.state_dict().items()}


def load_state(model: torch.nn.Module, state: dict[str, np.ndarray], source: str = "checkpoint") -> None:
    """Copy ``state`` into ``model``; refuse missing, unexpected or mismatched keys, listing them all."""
    own = model.state_dict()
    check_state({k: tuple(t.shape) for k, t in own.items()}, state, source,
                getattr(getattr(model, "spec", None), "name", "the model"))
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(torch.from_numpy(np.asarray(state[k])).to(dtype=t.dtype))
