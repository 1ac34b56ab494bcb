"""Moving numpy state dicts (canonical names) in and out of a MindSpore DVT, strictly.

State dicts use the canonical (torch) names; MindSpore's own names differ only where dvt_core.naming
says so (LayerNorm ``gamma``/``beta``). Problems are reported under the canonical names.
"""
from __future__ import annotations

import numpy as np

from dvt_core.errors import CheckpointError, list_problems
from dvt_core.naming import mindspore_to_canonical

from . import compat as C


def named_parameters(model) -> dict:
    """Canonical name -> MindSpore Parameter, for every parameter of ``model`` (frozen ones included)."""
    return {mindspore_to_canonical(name): p for name, p in model.parameters_and_names()}


def model_state(model) -> dict[str, np.ndarray]:
    """Every parameter as a numpy array (a copy), canonical names."""
    return {k: C.to_numpy(p).copy() for k, p in named_parameters(model).items()}


def load_state(model, state: dict[str, np.ndarray], source: str = "checkpoint") -> None:
    """Copy ``state`` into ``model``; refuse missing, unexpected or mismatched keys, listing them all."""
    own = named_parameters(model)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(np.shape(state[k]))} vs {C.shape_of(p)}"
                  for k, p in own.items() if k in state and tuple(np.shape(state[k])) != C.shape_of(p)]
    if missing or unexpected or mismatched:
        name = getattr(getattr(model, "spec", None), "name", "the model")
        raise CheckpointError(f"{source} does not match {name}: " + list_problems(missing, unexpected, mismatched),
                              missing, unexpected, mismatched)
    for k, p in own.items():
        C.set_param(p, state[k])
