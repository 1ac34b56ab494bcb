"""Moving numpy state dicts (canonical names) in and out of a torch DVT, strictly."""
from __future__ import annotations

import numpy as np
import torch

from dvt_core.errors import CheckpointError, list_problems


def model_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter and persistent buffer as float32 numpy arrays, canonical names."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_state(model: torch.nn.Module, state: dict[str, np.ndarray], source: str = "checkpoint") -> None:
    """Copy ``state`` into ``model``; refuse missing, unexpected or mismatched keys, listing them all."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(np.shape(state[k]))} vs {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(np.shape(state[k])) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        name = getattr(getattr(model, "spec", None), "name", "the model")
        raise CheckpointError(f"{source} does not match {name}: " + list_problems(missing, unexpected, mismatched),
                              missing, unexpected, mismatched)
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(torch.from_numpy(np.asarray(state[k])).to(dtype=t.dtype))
