"""The runtime contract: what an executor of a DVT provides, in two layers, written once.

* :class:`Runtime`: what every executor provides, whether it trains or only runs fixed graphs: its name,
  device checks, tensors in and out, one stage at a time (:meth:`~Runtime.run_stage`), the rows of the images
  that go on (:meth:`~Runtime.select`), several batches of one stage as one (:meth:`~Runtime.join`), an
  inference context, a precision. Everything derivable from those primitives (every exit's logits, true
  early exit, ``model.adaptive``) is written here, once, and no runtime overrides it.
* :class:`Framework` (a :class:`Runtime`): what a training framework adds: building a model from a spec,
  its state under canonical names, its checkpoint files, and its trainer (``dvt_core.training``).
* :class:`GraphRuntime` (a :class:`Runtime`): what a runtime of exported per-stage graphs adds: opening an
  export folder. Its primitives are shared by every graph runtime (``dvt_core.export.graph``).

A runtime lives in its own package ``dvt_backends.<name>`` whose ``RUNTIME`` is an instance of one of these
classes; :data:`dvt_core.runtimes.RUNTIMES` is the registry (adding a runtime: its folder plus one line there).

Terms: *model*: what ``build_model`` or ``open`` returns; it carries ``model.spec`` (the
:class:`~dvt_core.model.specs.CascadeSpec`), ``model.backend_name`` (how :func:`backend_of` finds its
runtime), ``model.exit_macs`` and ``model.checkpoint_meta``. *tensor*: the runtime's array type (dvt_core
itself only holds numpy arrays). *carry*: what one stage hands to the next (its final tokens and attention
logits), opaque to dvt_core. *state*: canonical tensor name -> numpy array (``dvt_core.model.shapes``).
"""
from __future__ import annotations

import abc
import importlib
from typing import Any, Optional, Sequence

import numpy as np

from dvt_core.errors import InputError, check_images_shape
from dvt_core.runtimes import RUNTIMES, import_runtime, runtime_names  # noqa: F401  (the registry, re-exported)

PRECISIONS = ("fp32", "bf16", "fp16")



class Runtime(abc.ABC):
    """What every executor of a DVT provides. Subclasses implement the primitives (abstract methods)."""

    name: str = ""
    """How ``build(..., backend=name)`` spells it ("torch", "onnx", ...)."""

    precisions: tuple[str, ...] = ("fp32",)
    """The precisions :meth:`set_precision` accepts here."""

    precisions_why: str = ""
    """Why the others are not offered (a measured reason, said when one is refused); empty when obvious."""

    # ---- primitives ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def device_for(self, device) -> Any:
        """This runtime's handle of ``device`` (a ``torch.device``, a MindSpore target, a provider), without a
        model; checks it before any work: :class:`InputError` naming a device it does not know or cannot use."""

    @abc.abstractmethod
    def to_device(self, model, device) -> Any:
        """The model on ``device`` (checked as :meth:`device_for` does); returns the model."""

    @abc.abstractmethod
    def to_tensor(self, model, array: np.ndarray) -> Any:
        """A float32 numpy image batch (N, C, H, W) as this runtime's input, on the model's device."""

    @abc.abstractmethod
    def to_numpy(self, tensor) -> np.ndarray:
        """A tensor (an exit's logits, say) as a float32 numpy array on the host."""

    @abc.abstractmethod
    def run_stage(self, model, index: int, images, carry: Optional[Any] = None) -> tuple[Any, Optional[Any]]:
        """Exit ``index`` on a tensor batch: ``(logits, carry for the next stage)``; ``carry`` is what stage
        ``index - 1`` returned for the same images (None for the first; None is returned after the last).
        No gradients are tracked; the model's mode (training or evaluation) is left as it is."""

    @abc.abstractmethod
    def select(self, images, carry: Any, rows: Sequence[int]) -> tuple[Any, Any]:
        """The ``rows`` of a tensor image batch and of its carry: the images that go on to the next stage."""

    @abc.abstractmethod
    def join(self, parts: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
        """Several ``(images, carry)`` batches of one stage as one, concatenated along the batch (what
        streaming early exit, ``dvt_core.runtime.streaming``, gathers from several input batches)."""

    @abc.abstractmethod
    def inference(self, model) -> Any:
        """A context manager: the model in evaluation mode, no gradients; the previous mode restored after."""

    def set_precision(self, model, precision: str) -> Any:
        """The model computing in ``precision`` (one of :attr:`precisions`); returns the model. A runtime that
        offers more than fp32 overrides this (and extends :attr:`precisions`)."""
        self.check_precision(precision)
        return model

    def set_threads(self, model, threads: int) -> Any:
        """The runtime's intra-op threads for ``model`` (a framework's are process-wide); returns the model.
        A runtime without such a setting refuses with :class:`InputError`."""
        raise InputError(f"the {self.name} runtime has no thread setting here; set OMP_NUM_THREADS instead")

    # ---- derived operations: written once, never in a runtime ---------------------------------------
    def check_precision(self, precision: str) -> str:
        """``precision`` if this runtime offers it, else :class:`InputError` listing what it offers."""
        if precision not in self.precisions:
            known = "" if precision in PRECISIONS else f" (precisions: {', '.join(PRECISIONS)})"
            why = f": {self.precisions_why}" if self.precisions_why and precision in PRECISIONS else ""
            raise InputError(f"the {self.name} runtime runs {', '.join(self.precisions)}, not {precision!r}{known}{why}")
        return precision

    def images_in(self, model, images) -> Any:
        """A user's image batch (numpy, or already this runtime's tensor) as a checked tensor batch."""
        if isinstance(images, np.ndarray) or isinstance(images, (list, tuple)):
            array = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
            check_images_shape(array.shape, model.spec)
            return self.to_tensor(model, array)
        shape = getattr(images, "shape", None)
        if shape is None:
            raise InputError(f"expected an image batch (a numpy array or a {self.name} tensor), "
                             f"got {type(images).__name__}")
        check_images_shape(shape, model.spec)
        return images

    def forward_numpy(self, model, images) -> list[np.ndarray]:
        """Every exit's logits of an image batch as float32 numpy arrays (evaluation mode, no gradients)."""
        x = self.images_in(model, images)
        out, carry = [], None
        with self.inference(model):
            for i in range(model.spec.num_exits):
                logits, carry = self.run_stage(model, i, x, carry)
                out.append(self.to_numpy(logits))
        return out

    def adaptive(self, model, images, thresholds: Optional[Sequence[float]] = None,
                 confidence: str = "max_softmax"):
        """True early exit: each image leaves at the first exit whose confidence reaches its threshold; only
        the images that go on run the next stage, with their rows of the carry. ``images``: numpy or this
        runtime's tensors; ``thresholds``: one per exit (the last is ignored) or one fewer; without them, the
        default operating point stored with the model. A :class:`~dvt_core.runtime.early_exit.AdaptiveResult`."""
        from dvt_core.runtime.early_exit import run_adaptive
        from dvt_core.runtime.operating_point import model_thresholds

        x = self.images_in(model, images)
        thresholds = model_thresholds(model, thresholds)
        with self.inference(model):
            return run_adaptive(self, model, x, thresholds, confidence)

    def adaptive_numpy(self, model, images: np.ndarray, thresholds: Sequence[float],
                       confidence: str = "max_softmax"):
        """:meth:`adaptive` of a float32 numpy batch with explicit thresholds."""
        return self.adaptive(model, images, thresholds, confidence)

    def __repr__(self) -> str:
        return f"<dvt runtime {self.name!r} ({type(self).__name__})>"


class Framework(Runtime):
    """A training framework's runtime: models built from specs, their state, their files, their trainer."""

    @abc.abstractmethod
    def build_model(self, spec) -> Any:
        """A freshly initialised model of ``spec`` (``dvt_core.model.recipe``), in evaluation mode; its
        ``backend_name`` is :attr:`name`; its state's names and shapes are ``state_shapes(spec)``."""

    @abc.abstractmethod
    def model_state(self, model) -> dict[str, np.ndarray]:
        """Every tensor of the model's state as a numpy array (a copy), under canonical names."""

    @abc.abstractmethod
    def load_state(self, model, state: dict, source: str = "checkpoint") -> None:
        """Copy a canonical ``state`` into ``model``; refuses, before changing anything, a state with missing,
        unexpected or mismatched tensors (:class:`~dvt_core.errors.CheckpointError` naming ``source``)."""

    @abc.abstractmethod
    def read_file(self, path) -> dict:
        """The entries of one of this framework's checkpoint files: name -> numpy array for tensors, plain
        values as they are. Only tensors and plain data are ever deserialised, never code."""

    @abc.abstractmethod
    def write_file(self, path, state: dict[str, np.ndarray], entries: dict[str, str]) -> None:
        """Write ``state`` (names as this framework spells them, ``dvt_core.checkpoint.naming``) and the string
        ``entries`` beside it to ``path`` (a temporary name; the caller renames it into place)."""

    def trainer(self, spec, config, device=None) -> Any:
        """This framework's side of training ``spec`` with the ``config`` (a
        :class:`~dvt_core.training.config.TrainConfig`) on ``device``: a
        :class:`dvt_core.training.trainer.Trainer` (its optimizer step, training-state file, modes), which
        the one loop :func:`dvt_core.training.loop.fit` drives. It is the framework package's
        ``train.make_trainer``, imported on first use so that inference never loads training code."""
        package = type(self).__module__.rsplit(".", 1)[0]
        return importlib.import_module(f"{package}.train").make_trainer(spec, config, device)


class GraphRuntime(Runtime):
    """A runtime of exported per-stage graphs (``dvt export``): it opens a folder; nothing to build or train."""

    graph_format: str = ""
    """The graph files it reads ("onnx", "mindir", "pt2"), as the export's manifest names them."""

    @abc.abstractmethod
    def open(self, directory, model: Optional[str] = None, device: str = "cpu", precision: str = "fp32",
             threads: Optional[int] = None) -> Any:
        """The export in ``directory`` (checked: manifest, hashes, ``model`` when given), ready to run on
        ``device`` in ``precision`` with ``threads`` intra-op threads (None: the runtime's default)."""


# ---- finding a runtime ------------------------------------------------------------------------------------


def get_backend(name: str) -> Runtime:
    """The runtime registered as ``name``, its package imported on first use; InputError naming what is wrong."""
    module = import_runtime(name)
    runtime = getattr(module, "RUNTIME", None)
    if not isinstance(runtime, Runtime):
        raise InputError(f"{module.__name__} does not fulfil the runtime contract: its RUNTIME is not a Runtime")
    return runtime


def backend_of(model) -> Runtime:
    """The runtime that built or opened ``model`` (read from ``model.backend_name``, never guessed)."""
    name = getattr(model, "backend_name", None)
    if not isinstance(name, str):
        raise InputError(f"not a dvt model: a {type(model).__name__} (build one with dvt_core.build)")
    return get_backend(name)


class ModelAPI:
    """The user methods every dvt model shares (torch, MindSpore and exported models mix this in): written
    here once, each a call into the model's runtime."""

    def adaptive(self, images, thresholds: Optional[Sequence[float]] = None, confidence: str = "max_softmax"):
        """True early exit (see :meth:`Runtime.adaptive`): numpy or tensor images, the stored default
        thresholds unless ``thresholds`` are given."""
        return backend_of(self).adaptive(self, images, thresholds, confidence)
