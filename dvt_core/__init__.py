"""dvt_core: the framework-agnostic half of DVT (Dynamic Vision Transformer, NeurIPS 2021).

Specs, the model zoo, exit policies and MAC accounting live here; ``build`` hands a spec to a backend
(``dvt_backends.torch``, ``dvt_backends.mindspore``) or an export folder to a graph runtime
(``dvt_backends.onnx``, ``dvt_backends.openvino``, ``dvt_backends.mindir``), importing that framework only then.

    >>> import dvt_core
    >>> model = dvt_core.build("dvt_t2t_vit_12", backend="torch")
    >>> dvt_core.exit_macs("dvt_t2t_vit_12")

The packages (README's layout section is the map): ``model`` (what a DVT is, from its spec alone),
``checkpoint`` (files and formats), ``data`` (images and data sets), ``runtime`` (the contract every
executor implements, ``build``, early exit, policy, streaming, evaluation), ``export`` (per-stage graphs),
``training`` (the one training loop), ``cli`` (the ``dvt`` command).
"""
from dvt_core.errors import CheckpointError, DataError, DVTError, InputError, SpecError, UnsafeCheckpointError
from dvt_core.model.specs import CascadeSpec, StageSpec, T2TSpec
from dvt_core.model.zoo import get_spec, list_models, static_spec

from dvt_core.version import __version__  # noqa: F401
# A checkpoint's training record is checked by the training configuration's own rules, which that layer
# adds to the checkpoint metadata rules: imported here, before anything can read a checkpoint.
from dvt_core.training import config as _training_config  # noqa: E402,F401

# The public modules a user reaches as ``dvt_core.<name>`` (loaded on first use: some import heavier code).
_PUBLIC_MODULES = {"policy": "dvt_core.runtime.policy", "operating_point": "dvt_core.runtime.operating_point",
                   "evaluation": "dvt_core.runtime.evaluation", "streaming": "dvt_core.runtime.streaming",
                   "macs": "dvt_core.model.macs", "shapes": "dvt_core.model.shapes"}
_MACS_FUNCTIONS = ("exit_macs", "stage_macs", "stage_params", "exit_params", "macs_table")


def build(name_or_spec=None, backend: str = "torch", weights=None, **options):
    from dvt_core.runtime.builder import build as _build

    return _build(name_or_spec, backend=backend, weights=weights, **options)


build.__doc__ = """Build a DVT for a backend, or open an export folder; see :func:`dvt_core.runtime.builder.build`."""


def preprocess(images, spec):
    from dvt_core.data.images import preprocess as _preprocess

    return _preprocess(images, spec)


preprocess.__doc__ = """Paths, PIL images or uint8 arrays -> the normalised float32 batch a spec's model expects;
see :func:`dvt_core.data.images.preprocess`."""


def __getattr__(name):
    import importlib

    if name in _MACS_FUNCTIONS:
        return getattr(importlib.import_module("dvt_core.model.macs"), name)
    if name in _PUBLIC_MODULES:
        return importlib.import_module(_PUBLIC_MODULES[name])
    if name in ("model", "checkpoint", "data", "runtime", "export", "training", "cli", "errors", "fileio",
                "integrations", "serve"):
        return importlib.import_module(f"dvt_core.{name}")
    raise AttributeError(f"module 'dvt_core' has no attribute {name!r}")


__all__ = ["build", "preprocess", "get_spec", "list_models", "static_spec", "CascadeSpec", "StageSpec", "T2TSpec",
           "SpecError", "InputError", "DataError", "CheckpointError", "UnsafeCheckpointError", "DVTError", "exit_macs"]
