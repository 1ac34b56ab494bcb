"""The trainer contract: what one framework supplies to the one training loop (:func:`dvt_core.training.loop.fit`).

The loop (resume, epochs, the schedule, held-out accuracy, checkpoint cadence, divergence stop,
calibration, final metadata) is written once, in dvt_core; a framework supplies its model, its
optimizer step and its training-state file through a :class:`Trainer`, the way Keras' backend trainers
supply ``train_step`` under one ``fit``. ``dvt_backends.<name>.train.make_trainer(spec, cfg, device)``
returns one.

Order of calls the loop makes: the constructor (seeded from ``cfg.seed``, the model built and on its
device), optionally :meth:`Trainer.load_weights` (``--init``) and :meth:`Trainer.set_teacher` (``dvt
adapt``), :meth:`Trainer.prepare` (optimizer, data-parallel wrapper), optionally :meth:`Trainer.load_state`
(``--resume``), then per epoch :meth:`Trainer.train_mode`, :meth:`Trainer.freeze` (when the loop is given
names to freeze), :meth:`Trainer.step` per batch, :meth:`Trainer.train_mode` off, the
held-out probabilities through ``self.model`` (the runtime contract), :meth:`Trainer.save_state` on
rank 0; finally :meth:`Trainer.weights` for the final file (rank 0) and :meth:`Trainer.barrier`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Trainer(ABC):
    """One framework's side of training a :class:`~dvt_core.model.specs.CascadeSpec`."""

    backend: str
    """The backend's name ("torch", "mindspore"), recorded as ``meta["backend"]``."""

    state_file: str
    """File name of the resumable training state inside the run's folder (``last.pth``, ``last.ckpt``)."""

    weights_suffix: str
    """Suffix of the final weights file (``.safetensors``, ``.ckpt``)."""

    weights_format: str
    """``dvt_core.checkpoint.files.write_checkpoint``'s ``fmt`` for the final weights ("safetensors", "mindspore")."""

    model: Any
    """The model being trained: a model of the runtime contract (``backend_of(model)`` works on it)."""

    rank: int = 0
    """This process's rank among the data-parallel processes (0 when alone)."""

    world: int = 1
    """The number of data-parallel processes (the launcher's; 1 when alone)."""

    @property
    @abstractmethod
    def device(self) -> str:
        """The device trained on, as words for the metadata ("cpu", "cuda:0", "CPU")."""

    @abstractmethod
    def weights(self) -> dict[str, np.ndarray]:
        """The model's state under canonical names (numpy copies)."""

    @abstractmethod
    def load_weights(self, state: dict[str, np.ndarray], source: str) -> None:
        """Copy a canonical ``state`` into the model (an ``--init`` start); refuses a mismatched one."""

    @abstractmethod
    def prepare(self) -> None:
        """Make the optimizer (AdamW over ``dvt_core.checkpoint.transfer.param_groups``) and, when
        ``world > 1``, the data-parallel machinery that averages gradients over the processes."""

    @abstractmethod
    def step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> float:
        """One optimizer step at learning rate ``lr`` on this process's share of a global batch (float32
        ``(n, C, H, W)``, int labels): multi-exit loss, gradients (averaged over the processes), clipping
        at ``cfg.grad_clip``, AdamW update. Returns this share's loss, before the update."""

    @abstractmethod
    def train_mode(self, on: bool) -> None:
        """Training mode (dropout, stochastic depth) on or off."""

    @abstractmethod
    def save_state(self, path, record: dict) -> None:
        """Write everything resuming needs to ``path`` (a temporary name the loop renames): the model's and
        the optimizer's state, the random generators' state and ``record`` (the loop's JSON-able
        counters: epoch, step, partial loss, history, init report)."""

    @abstractmethod
    def load_state(self, path) -> dict:
        """Restore what :meth:`save_state` wrote (model, optimizer, generators) and return its ``record``."""

    @abstractmethod
    def saved_weights(self, path) -> dict:
        """The model tensors a :meth:`save_state` file holds, canonical name -> array (anything with a
        ``shape``), read without changing the model: what the resume check compares with the spec.
        Raises on a file it cannot read."""

    def set_teacher(self, spec, state: dict[str, np.ndarray], temperature: float, weight: float) -> None:
        """Distil from a frozen static teacher (``spec``, canonical ``state``) from now on: :meth:`step` adds
        ``weight`` times the exits' temperature-softened divergence from the teacher's prediction, the
        teacher run once per batch in the model's precision. Called before :meth:`prepare`."""
        from dvt_core.errors import InputError

        raise InputError(f"the {self.backend} trainer does not distil from a teacher; use the torch backend")

    def freeze(self, names) -> None:
        """Hold the parameters ``names`` still (no update, no weight decay) until called again; ``()`` frees
        them. The loop calls it at the start of every epoch."""
        from dvt_core.errors import InputError

        raise InputError(f"the {self.backend} trainer does not freeze weights; use the torch backend")

    def barrier(self) -> None:
        """Wait for every process (the end of a data-parallel run); nothing to wait for when alone."""
