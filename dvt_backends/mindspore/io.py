"""Moving numpy state dicts (canonical names) in and out of a MindSpore DVT, strictly.

State dicts use the canonical (torch) names; MindSpore's own names differ only where dvt_core.checkpoint.naming
says so (LayerNorm ``gamma``/``beta``). Problems are reported under the canonical names.
"""
from __future__ import annotations

import numpy as np

from dvt_core.model.shapes import check_state
from dvt_core.checkpoint.naming import mindspore_to_canonical

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
    check_state({k: C.shape_of(p) for k, p in own.items()}, state, source,
                getattr(getattr(model, "spec", None), "name", "the model"))
    for k, p in own.items():
        C.set_param(p, state[k])
