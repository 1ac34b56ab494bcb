"""dvt_core: the framework-agnostic half of DVT (Dynamic Vision Transformer, NeurIPS 2021).

Specs, the model zoo, exit policies and MAC accounting live here; ``build`` hands a spec to a backend
(``dvt_backends.torch`` or ``dvt_backends.mindspore``), importing that framework only then.

    >>> import dvt_core
    >>> model = dvt_core.build("dvt_t2t_vit_12", backend="torch")
    >>> dvt_core.exit_macs("dvt_t2t_vit_12")
"""
from ._layout import register_checkout_backends

register_checkout_backends()

from .errors import CheckpointError, DVTError, InputError, UnsafeCheckpointError
from .specs import CascadeSpec, SpecError, StageSpec, T2TSpec
from .zoo import get_spec, list_models, static_spec

__version__ = "0.1.0"


def build(name_or_spec=None, backend: str = "torch", weights=None, **overrides):
    from .builder import build as _build

    return _build(name_or_spec, backend=backend, weights=weights, **overrides)


build.__doc__ = """Build a DVT for a backend; see :func:`dvt_core.builder.build`."""


def preprocess(images, spec):
    from .images import preprocess as _preprocess

    return _preprocess(images, spec)


preprocess.__doc__ = """Paths, PIL images or uint8 arrays -> the normalised float32 batch a spec's model expects;
see :func:`dvt_core.images.preprocess`."""


def __getattr__(name):
    # Submodules with heavier imports load on first use.
    if name in ("exit_macs", "stage_macs", "stage_params", "exit_params", "macs_table"):
        from . import macs

        return getattr(macs, name)
    if name in ("policy", "checkpoints", "naming", "resample", "early_exit", "data", "macs", "weights", "evaluation",
                "training", "convert", "plots", "backend", "shapes", "recipe", "images", "fileio",
                "ckpt_format", "operating_point", "datasets"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dvt_core' has no attribute {name!r}")


__all__ = ["build", "preprocess", "get_spec", "list_models", "static_spec", "CascadeSpec", "StageSpec", "T2TSpec",
           "SpecError", "InputError", "CheckpointError", "UnsafeCheckpointError", "DVTError", "exit_macs"]
