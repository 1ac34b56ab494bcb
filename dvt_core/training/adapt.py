"""A DVT from the static ViT a user already has (``dvt adapt``): :func:`adapt`.

Every stage starts from the one static checkpoint (:mod:`dvt_core.checkpoint.adapt`: weights copied,
patch kernels resized, position embeddings resampled, reuse modules neutral). With ``cfg`` None the
initialised cascade is written without reading any data; otherwise it is fine-tuned by the one training
loop (:func:`dvt_core.training.runs.train_dataset`, then :func:`~dvt_core.training.loop.fit`) on the
multi-exit loss plus distillation from the frozen static model (the teacher: the static model at the last
stage's grid, the static model itself when their grids agree), optionally with the last stage held still
(every one of its tensors) for the first epochs, and calibrated at the end as ``dvt train`` is, except that
the default operating point is the cheapest one reaching the static model's held-out accuracy (what a user
converting a static model asks: its accuracy for fewer MACs), not the last exit's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from dvt_core.checkpoint import adapt as adapt_ckpt
from dvt_core.data import sources as dvt_data
from dvt_core.errors import InputError
from dvt_core.model.zoo import get_spec, static_spec
from dvt_core.training import config as C
from dvt_core.training.config import TrainConfig

PROBE_IMAGES = 32  # random images the start is compared on when no data is read (epochs 0)

# The fine-tuning recipe `dvt adapt` uses by default, where it differs from `dvt train`'s. Measured on
# Fashion-MNIST (5 epochs, one seed each; README): no random crops and flips (a start from trained weights
# needs to move, not to be regularised), rate 1e-3 at batch 128, the last stage held still for the first epoch.
RECIPE = {"epochs": 5, "batch_size": 128, "lr": 1e-3, "warmup_epochs": 0.5, "augment": False}
FREEZE_EPOCHS = 1


def recipe(**changes) -> TrainConfig:
    """``dvt adapt``'s fine-tuning recipe (:data:`RECIPE` over ``dvt train``'s) as a TrainConfig, with ``changes``."""
    return replace(TrainConfig(), **{**RECIPE, **changes})


@dataclass(frozen=True)
class Distillation:
    """Soft targets from the frozen static model: ``weight`` times the temperature-softened KL divergence
    of every exit from the teacher (``weight`` 0: the multi-exit loss alone)."""

    weight: float = 1.0
    temperature: float = 2.0

    def check(self) -> "Distillation":
        if not (np.isfinite(self.weight) and self.weight >= 0):
            raise InputError(f"the distillation weight must be a finite number >= 0, got {self.weight}")
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"the distillation temperature must be a finite number > 0, got {self.temperature}")
        return self


def _teacher(spec, state: dict) -> tuple:
    """``(spec, state)`` of the static teacher: the last stage as the static model it started from."""
    last = spec.num_exits - 1
    return static_spec(spec, last, name="static_teacher"), adapt_ckpt.stage_as_static(state, spec, last)


STATIC_RULE = "cheapest budget whose held-out accuracy reaches the static model's"


def _teacher_model(backend: str, spec, state: dict):
    """The static model the adapted ``spec`` started from, built in ``backend`` from the adapted ``state``."""
    from dvt_core.runtime.contract import get_backend

    teacher_spec, teacher_state = _teacher(spec, state)
    runtime = get_backend(backend)
    teacher = runtime.build_model(teacher_spec)
    runtime.load_state(teacher, teacher_state, source="the static model")
    return teacher


def init_difference(model, teacher, spec, images: np.ndarray, on: str) -> dict:
    """The adapted ``model``'s last exit against the static model ``teacher`` on uint8 ``images``: the largest
    logit difference and the share of equal predictions."""
    from dvt_core.runtime.contract import backend_of

    x = dvt_data.normalize(images, spec.mean, spec.std)
    last = backend_of(model).forward_numpy(model, x)[-1]
    static = backend_of(teacher).forward_numpy(teacher, x)[0]
    return {"images": int(len(images)), "on": on, "max_abs_logit": float(np.abs(last - static).max()),
            "same_prediction": float((last.argmax(-1) == static.argmax(-1)).mean())}


def static_accuracy(teacher, images: np.ndarray, labels: np.ndarray) -> float:
    """The static model's accuracy (%) on uint8 ``images``: what the default operating point must reach."""
    from dvt_core.runtime.evaluation import exit_probs

    return float((exit_probs(teacher, images)[0].argmax(-1) == labels).mean() * 100)


def difference_line(diff: dict) -> str:
    return (f"last exit against the static model on {diff['images']} {diff['on']}: max |logit difference| "
            f"{diff['max_abs_logit']:.2e}, same prediction for {100 * diff['same_prediction']:.1f} %")


def _start(static, spec, trainer, source: str, log) -> tuple[dict, adapt_ckpt.AdaptReport]:
    """The adapted state, loaded into ``trainer``'s model, and its report (printed)."""
    state, report = adapt_ckpt.adapt_state(static, trainer.weights(), spec, source)
    trainer.load_weights(state, source=source)
    for line in report.lines():
        log(line)
    return state, report


def write_initialised(static, spec, out_dir, backend: str = "torch", device: Optional[str] = None,
                      name: Optional[str] = None, force: bool = False, source: str = "",
                      log: Callable[[str], None] = print) -> Path:
    """``--epochs 0``: the initialised cascade written to ``out_dir`` (no data read); its path."""
    from dvt_core.checkpoint.files import write_checkpoint
    from dvt_core.model.macs import exit_macs
    from dvt_core.training.loop import make_trainer, output_paths
    from dvt_core.training.runs import check_out

    trainer = make_trainer(backend, spec, TrainConfig(epochs=1), device)
    state_path, final = output_paths(trainer, out_dir, C.model_file_name(name or spec.name))
    check_out(state_path, final, resume=False, force=force)
    state, report = _start(static, spec, trainer, source, log)
    probe = np.random.default_rng(0).integers(0, 256, (PROBE_IMAGES, spec.img_size, spec.img_size)
                                              + ((spec.in_chans,) if spec.in_chans > 1 else ()), dtype=np.uint8)
    report.init_difference = init_difference(trainer.model, _teacher_model(backend, spec, state), spec, probe,
                                             "random images")
    log(difference_line(report.init_difference))
    meta = {"arch": spec.name, "spec": spec.to_dict(), "exit_macs": [int(m) for m in exit_macs(spec)],
            "backend": trainer.backend, "adapt": report.to_meta()}
    write_checkpoint(final, trainer.weights(), meta, fmt=trainer.weights_format, force=force, parents=True)
    log(f"wrote {final} (initialised, not fine-tuned)")
    return final


def adapt(static_file, spec: Union[str, object], out_dir, cfg: Optional[TrainConfig] = None,
          dataset="fashion-mnist", backend: str = "torch", device: Optional[str] = None,
          distill: Distillation = Distillation(), freeze_epochs: int = FREEZE_EPOCHS, name: Optional[str] = None,
          force: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """A ``spec`` DVT in ``out_dir`` with every stage from the static model in ``static_file``; the weights'
    path. ``cfg`` None: initialised only (no data read). Otherwise fine-tuned on ``dataset`` with ``cfg``
    (``cfg.holdout`` None: the data set's default), ``distill`` from the static model, the last stage's
    tensors (copied and new) frozen for the first ``freeze_epochs`` epochs, and calibrated."""
    from dvt_core.training.runs import train_dataset

    spec = get_spec(spec)
    static = adapt_ckpt.read_static(static_file)
    source = str(static_file)
    if cfg is None:
        return write_initialised(static, spec, out_dir, backend, device, name, force, source, log)
    distill = distill.check()
    if not 0 <= freeze_epochs <= cfg.epochs:
        raise InputError(f"freeze epochs must lie between 0 and the {cfg.epochs} epochs, got {freeze_epochs}")

    def setup(trainer, final_spec, images, labels, final_cfg) -> dict:
        say = log if trainer.rank == 0 else (lambda _line: None)  # one report under torchrun, not one per process
        state, report = _start(static, final_spec, trainer, source, say)
        _, hold_idx = dvt_data.split_holdout(len(images), final_cfg.holdout, final_cfg.seed)
        probe = images[hold_idx[:1000]] if len(hold_idx) else images[:PROBE_IMAGES]
        teacher = _teacher_model(backend, final_spec, state)  # built once: the difference and the target
        report.init_difference = init_difference(trainer.model, teacher, final_spec, probe,
                                                 "held-out images" if len(hold_idx) else "training images")
        say(difference_line(report.init_difference))
        at_init = _anytime(trainer, final_spec, images, labels, hold_idx, say)
        more = {}
        if len(hold_idx):  # the user's static model sets the accuracy the default operating point keeps
            target = static_accuracy(teacher, images[hold_idx], labels[hold_idx])
            say(f"the static model on the same held-out images: {target:.1f} %")
            more = {"calibrate_to": (target, STATIC_RULE)}
        if distill.weight:
            if any(".head." in r for r in report.reinitialised):
                raise InputError("the static model predicts other classes than the data set: it cannot teach "
                                 "them; pass --distill-weight 0")
            trainer.set_teacher(*_teacher(final_spec, state), distill.temperature, distill.weight)
        last = final_spec.num_exits - 1
        extra = {"adapt": {**report.to_meta(), "holdout_accuracy_at_init": at_init,
                           "distillation": {"weight": distill.weight, "temperature": distill.temperature},
                           "freeze_epochs": int(freeze_epochs)}}
        freeze = (adapt_ckpt.stage_names(state, last), freeze_epochs) if freeze_epochs else None
        return {"extra_meta": extra, "freeze": freeze, **more}

    return train_dataset(dataset, spec, cfg, out_dir, backend=backend, device=device, name=name, force=force,
                         progress=progress, log=log, setup=setup)


def _anytime(trainer, spec, images, labels, hold_idx, log) -> Optional[list]:
    """Held-out accuracy of every exit as initialised (None when nothing is held out), printed."""
    from dvt_core.runtime.evaluation import exit_probs
    from dvt_core.training.loop import exit_labels

    if not len(hold_idx):
        return None
    probs = exit_probs(trainer.model, images[hold_idx])
    accs = [float(a) for a in (probs.argmax(-1) == labels[hold_idx]).mean(1) * 100]
    log("as initialised, held-out accuracy: " + ", ".join(f"{lab} {a:.1f} %" for lab, a in zip(exit_labels(spec), accs)))
    return accs
