"""PyTorch backend: ``build_model(spec)``, ``load_state(model, state)``, ``model_state(model)``."""
from .cascade import DVT, Reuse, Stage
from .io import load_state, model_state

NAME = "torch"


def build_model(spec) -> DVT:
    return DVT(spec)


__all__ = ["DVT", "Stage", "Reuse", "build_model", "load_state", "model_state", "NAME"]
