"""The backend contract: what a framework backend provides, written once.

A backend is a module, ``dvt_backends.<name>``, that defines every member of :class:`Backend` at
module level with exactly the signature written here (a test compares them with ``inspect``).
Everything in ``dvt_core`` that touches a model (building, loading weights, evaluation, early exit,
conversion, the CLI) goes through these members and nothing else, so a new runtime plugs in by
providing them.

Terms:

* *model*: what ``build_model`` returns; it carries ``model.spec`` (the :class:`~dvt_core.model.specs.CascadeSpec`),
  ``model.backend_name`` (the backend's ``NAME``, how :func:`backend_of` finds the backend),
  ``model.exit_macs`` and ``model.checkpoint_meta``.
* *tensor*: the framework's array type. dvt_core itself only ever holds numpy arrays.
* *carry*: what one stage hands to the next (its final tokens and its attention logits); opaque to
  dvt_core, which only passes it back to ``run_stage`` and ``select``.
* *state*: canonical tensor name (the torch backend's ``state_dict`` keys; ``dvt_core.checkpoint.naming``) ->
  numpy array; its names and shapes are ``dvt_core.model.shapes.state_shapes(model.spec)``.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from dvt_core.errors import InputError


@runtime_checkable
class Backend(Protocol):
    """The members every ``dvt_backends.<name>`` module defines (functions at module level)."""

    NAME: str
    """The backend's name, as ``build(..., backend=NAME)`` spells it ("torch", "mindspore")."""

    def build_model(self, spec) -> Any:
        """A freshly initialised model of ``spec`` (initialised by ``dvt_core.model.recipe``), in evaluation mode.

        The model's ``backend_name`` is ``NAME``; its state's names and shapes are ``state_shapes(spec)``.
        """

    def model_state(self, model) -> dict[str, np.ndarray]:
        """Every tensor of the model's state as a numpy array (a copy), under canonical names."""

    def load_state(self, model, state: dict, source: str = "checkpoint") -> None:
        """Copy a canonical ``state`` into ``model``.

        Refuses, before changing anything, a state with missing, unexpected or mismatched tensors:
        :class:`~dvt_core.errors.CheckpointError` listing them all (``dvt_core.model.shapes.check_state``),
        naming ``source``.
        """

    def to_device(self, model, device) -> Any:
        """The model on ``device`` (a string such as "cpu", "cuda:0", "gpu"); returns the model.

        A device this backend does not know, or cannot use on this machine, is an
        :class:`~dvt_core.errors.InputError` naming it.
        """

    def device_for(self, device) -> Any:
        """This backend's handle of ``device`` (a ``torch.device``, a MindSpore target name), without a
        model: what ``to_device`` moves a model to. Checks ``device`` before any work is done; the same
        :class:`~dvt_core.errors.InputError` as ``to_device`` for one it does not know or cannot use here.
        """

    def to_tensor(self, model, array: np.ndarray) -> Any:
        """A float32 numpy image batch (N, C, H, W) as this backend's tensor, on the model's device."""

    def to_numpy(self, tensor) -> np.ndarray:
        """A tensor (an exit's logits, say) as a numpy array on the host."""

    def run_stage(self, model, index: int, images, carry: Optional[Any] = None) -> tuple[Any, Optional[Any]]:
        """Run exit ``index`` on a tensor batch: ``(logits, carry for the next stage)``.

        ``carry`` is what ``run_stage(model, index - 1, ...)`` returned for the same images (None for
        the first stage); the returned carry is None after the last stage. For inference: no gradients
        are tracked, and the model's mode (training or evaluation) is left as it is.
        """

    def select(self, images, carry: Any, rows: Sequence[int]) -> tuple[Any, Any]:
        """The ``rows`` of a tensor image batch and of its carry: the images that go on to the next stage."""

    def join(self, parts: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
        """Several ``(images, carry)`` batches of the same stage as one, concatenated along the batch
        (what streaming early exit, dvt_core.runtime.streaming, gathers from several input batches)."""

    def inference(self, model) -> Any:
        """A context manager: the model in evaluation mode, no gradients tracked; the previous mode is
        restored on exit."""

    def forward_numpy(self, model, images: np.ndarray) -> list[np.ndarray]:
        """Every exit's logits of a float32 numpy batch (N, C, H, W), in evaluation mode, without gradients."""

    def adaptive_numpy(self, model, images: np.ndarray, thresholds: Sequence[float],
                       confidence: str = "max_softmax") -> Any:
        """True early exit (``model.adaptive``) on a float32 numpy batch: a
        :class:`~dvt_core.runtime.early_exit.AdaptiveResult`."""

    def read_file(self, path) -> dict:
        """The entries of one of this framework's checkpoint files: name -> numpy array for tensors,
        plain values (str, int, float, nested dicts) as they are. Raises what the framework raises on a
        bad file; only tensors and plain data are ever deserialised, never code."""

    def write_file(self, path, state: dict[str, np.ndarray], entries: dict[str, str]) -> None:
        """Write ``state`` (names as this framework spells them, ``dvt_core.checkpoint.naming``) and the string
        ``entries`` beside it to ``path`` (a temporary name; the caller renames it into place)."""


MEMBERS = tuple(name for name in Backend.__dict__ if not name.startswith("_")) + ("NAME",)
BACKENDS = ("torch", "mindspore", "onnx", "mindir", "openvino")
# run a `dvt export` folder (per-stage graphs, dvt_core.export.writer); nothing to build or train
EXPORT_BACKENDS = ("onnx", "mindir", "openvino")
PACKAGES = {"onnx": "onnxruntime", "mindir": "mindspore", "openvino": "openvino"}  # the package a backend cannot run without


def _raised_by_dvt(exc: ImportError) -> bool:
    """True when ``exc`` names a dvt module, or was raised by a line of dvt itself (not of a framework)."""
    if (exc.name or "").split(".")[0] in ("dvt_core", "dvt_backends"):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or exc.name:
        return False
    ours = [Path(__file__).resolve().parents[1]]  # dvt_core, and wherever dvt_backends lives
    backends = sys.modules.get("dvt_backends")
    ours += [Path(p).resolve() for p in getattr(backends, "__path__", ())]
    try:
        where = Path(tb.tb_frame.f_code.co_filename).resolve()
    except (OSError, ValueError):
        return False
    return any(where.is_relative_to(d) for d in ours)


def get_backend(name: str):
    """The backend module ``dvt_backends.<name>``, imported on first use; InputError naming what is wrong."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(f"dvt_backends.{name}")
    except ImportError as exc:
        # A framework that is missing or broken is the user's to install; an ImportError raised by dvt's
        # own code is a bug and keeps its traceback.
        if _raised_by_dvt(exc):
            raise
        raise InputError(f"the {name} backend needs the {PACKAGES.get(name, name)} package ({exc}); "
                         f"install it with: pip install 'dvt[{name}]'") from None
    lacking = missing_members(module)
    if lacking:
        raise InputError(f"dvt_backends.{name} does not fulfil the backend contract: it lacks {', '.join(lacking)}")
    return module


def missing_members(module) -> list[str]:
    """The members of the contract ``module`` does not define."""
    return [m for m in MEMBERS if not hasattr(module, m)]


def backend_of(model):
    """The backend module that built ``model`` (read from ``model.backend_name``, never guessed)."""
    name = getattr(model, "backend_name", None)
    if not isinstance(name, str):
        raise InputError(f"not a dvt model: a {type(model).__name__} (build one with dvt_core.build)")
    return get_backend(name)


def run_adaptive(model, images: np.ndarray, thresholds: Sequence[float], confidence: str = "max_softmax"):
    """True early exit of a numpy batch driven through the contract alone (``run_stage`` / ``select``).

    The same loop as each backend's ``model.adaptive``; any backend that fulfils the contract gets it.
    """
    from dvt_core.runtime.early_exit import run_adaptive as loop

    b = backend_of(model)
    x = b.to_tensor(model, np.ascontiguousarray(images, dtype=np.float32))
    return loop(lambda i, imgs, carry: b.run_stage(model, i, imgs, carry), b.to_numpy, b.select, x, len(images),
                thresholds, model.exit_macs, confidence)
