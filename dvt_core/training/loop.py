"""The one training loop, every framework's: :func:`fit`.

A framework supplies its :class:`~dvt_core.training.trainer.Trainer` (model, optimizer step, state
file); this module does everything else once: the held-out split, ``--init``, resume (checked against
the spec by the one state diff), the epochs and the cosine schedule (:func:`run_epoch`), held-out
accuracy per exit, checkpoints every ``cfg.checkpoint_every`` epochs, the divergence stop, calibration
of the default operating point and the final metadata.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dvt_core.data import sources as dvt_data
from dvt_core.errors import InputError
from dvt_core.training import config as C
from dvt_core.training.config import TrainConfig
from dvt_core.training.trainer import Trainer
from dvt_core.checkpoint.files import write_checkpoint


def make_trainer(backend: str, spec, cfg: TrainConfig, device: Optional[str] = None) -> Trainer:
    """The ``backend``'s :class:`Trainer` for ``spec``: ``Framework.trainer`` of the runtime contract (an
    unknown or missing backend, or a runtime that does not train, said plainly)."""
    from dvt_core.runtime.contract import Framework, get_backend

    framework = get_backend(backend)
    if not isinstance(framework, Framework):
        raise InputError(f"the {backend} runtime runs exported graphs and cannot train; use torch or mindspore")
    if device is not None:  # a device the backend cannot use here: InputError before any work
        framework.device_for(device)
    return framework.trainer(spec, cfg, device)


def check_resumable(trainer: Trainer, path, spec) -> None:
    """InputError unless ``path`` (a run's training state) holds weights of ``spec``'s architecture: the one
    spec-state diff (:func:`dvt_core.model.shapes.state_diff`) for every framework."""
    from dvt_core.model.shapes import state_diff, state_shapes

    try:
        saved = trainer.saved_weights(path)
    except Exception as exc:  # a truncated or foreign file, whatever the framework's reader raises
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot resume from {path}: not a readable training checkpoint ({first})") from None
    missing, unexpected, mismatched = state_diff(state_shapes(spec), saved)
    diff = missing + unexpected + mismatched
    if diff:
        raise InputError(f"cannot resume from {path}: it holds another architecture than {spec.name} with "
                         f"these overrides ({len(diff)} tensors differ, e.g. {diff[0]}); use the same --model "
                         "and -O, or another --out")


def exit_labels(spec) -> list[str]:
    """``exit 1 (2x2)`` per exit: its number and token grid."""
    return [f"exit {k + 1} ({st.grid}x{st.grid})" for k, st in enumerate(spec.stages)]


def epoch_line(spec, record: dict, epochs: int) -> str:
    """The line printed after an epoch: loss, its time, the labelled held-out accuracy of every exit."""
    line = f"epoch {record['epoch']}/{epochs} loss {record['loss']:.4f} ({record['epoch_seconds']:.1f} s)"
    accs = record.get("holdout_accuracy")
    if accs:
        line += "; held-out accuracy: " + ", ".join(f"{label} {a:.1f} %"
                                                    for label, a in zip(exit_labels(spec), accs))
    return line


FEW_HOLDOUT = 300  # an operating point chosen on fewer held-out images moves with every draw
FEW_TRAIN = 10_000  # fewer images than this rarely train a cascade from scratch as well as a fine-tune does


def note_small_data(say, arch: str, train_images: int, holdout_images: int, from_scratch: bool) -> None:
    """``say`` a ``# note:`` line for each way a run's data is too small: a held-out part too small to calibrate on,
    a training set better served by a fine-tune than by training from scratch."""
    from dvt_core.checkpoint.registry import has_shipped_weights

    if 0 < holdout_images < FEW_HOLDOUT:
        say(f"# note: the operating point will be calibrated on only {holdout_images} held-out images; below about "
            f"{FEW_HOLDOUT} it is noise: hold out more (--holdout) or calibrate later on more labelled images "
            "(dvt calibrate --dataset DIR)")
    if from_scratch and train_images < FEW_TRAIN:
        start = "its shipped weights (--init default)" if has_shipped_weights(arch) else "a trained model (--init FILE)"
        say(f"# note: {train_images} training images are few to train {arch} from scratch; a fine-tune of {start} "
            "usually learns them faster and better")


def summary_line(meta: dict) -> Optional[str]:
    """The calibrated default operating point's held-out accuracy and average MACs (None if not calibrated)."""
    op = meta.get("default_operating_point")
    if not op:
        return None
    return (f"calibrated operating point: {op['holdout_accuracy']:.2f} % held-out accuracy at "
            f"{op['holdout_macs'] / 1e6:.3f}M MACs per image on average (all exits: "
            f"{meta['exit_macs'][-1] / 1e6:.3f}M)")


def _start(trainer: Trainer, spec, init, init_state: Optional[dict], log) -> Optional[object]:
    """Load ``init_state`` (canonical numpy weights) and/or ``--init`` FILE into the fresh model; the
    transfer report (or None)."""
    from dvt_core.checkpoint.transfer import load_init

    if init_state is not None:
        trainer.load_weights(init_state, source="init_state")
    if init is None:
        return None
    state, report = load_init(init, spec, trainer.weights())
    trainer.load_weights(state, source=str(init))
    log("\n".join(report.lines()))
    return report


def _resume(trainer: Trainer, state_path: Path, spe: int, log):
    """``(step, history, partial, init report or None)`` restored from ``state_path``."""
    record = trainer.load_state(state_path)
    history, step = list(record["history"]), int(record["step"])
    partial = (0.0, 0)
    if step % spe:  # stopped inside an epoch (--max-steps): its record is completed, not repeated
        history = history[:-1]
        partial = (float(record["partial"][0]), int(record["partial"][1]))
    log(f"resumed from {state_path} at epoch {step // spe + 1}, step {step}")
    return step, history, partial, record.get("init")


def _holdout_probs(trainer: Trainer, images: np.ndarray, hold_idx) -> Optional[np.ndarray]:
    from dvt_core.runtime.evaluation import exit_probs

    if not len(hold_idx):
        return None
    trainer.train_mode(False)
    return exit_probs(trainer.model, images[hold_idx])


def output_paths(trainer: Trainer, out_dir, name: str) -> tuple[Path, Path]:
    """``(training state, final weights)`` of a run in ``out_dir``: the trainer's fixed state file name and
    ``name`` (already sanitised, :func:`dvt_core.training.config.model_file_name`) plus its suffix."""
    out_dir = Path(out_dir)
    return out_dir / trainer.state_file, out_dir / f"{C.model_file_name(name)}{trainer.weights_suffix}"


def fit(spec, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, out_dir, backend: str = "torch",
        device: Optional[str] = None, resume: bool = False, progress: bool = True, init=None,
        init_state: Optional[dict] = None, dataset=None, name: Optional[str] = None,
        extra_meta: Optional[dict] = None, trainer: Optional[Trainer] = None,
        log: Callable[[str], None] = print, freeze: Optional[tuple[list, int]] = None,
        calibrate_to: Optional[tuple[float, str]] = None) -> Path:
    """Train ``spec`` on uint8 ``images`` (N, H, W[, C]) and ``labels``; returns the final weights' path.

    ``cfg.holdout`` images (drawn with ``cfg.seed``) are kept out of training, scored after every epoch
    and calibrate the default operating point at the end. Writes ``<out_dir>/<state_file>`` every
    ``cfg.checkpoint_every`` epochs (and at the end) and ``<out_dir>/<name><suffix>`` (weights and
    metadata; ``name`` defaults to ``spec.name``, sanitised). ``resume`` continues the state file there,
    bit for bit; ``init`` is a checkpoint to start from (:func:`dvt_core.checkpoint.transfer.load_init`),
    ``init_state`` canonical weights to start from. ``dataset`` is where the images came from
    (:func:`dvt_core.training.config.dataset_record`). A loss that is not finite stops the run with
    :class:`~dvt_core.training.config.TrainingDiverged` before any weights of its epoch are written.
    ``trainer`` (else ``make_trainer(backend, ...)``) is the framework's side; several processes
    started by the framework's launcher each run ``fit`` and split every global batch. ``freeze``
    ``(names, epochs)`` holds those parameters still for the first ``epochs`` epochs (:meth:`Trainer.freeze`);
    ``calibrate_to`` ``(accuracy, rule)``: the held-out accuracy the default operating point must reach."""
    cfg = C.resolve_holdout(cfg.validate(), len(images))
    trainer = trainer or make_trainer(backend, spec, cfg, device)
    main = trainer.rank == 0
    say = log if main else (lambda _line: None)
    if cfg.batch_size % trainer.world:
        raise C.ConfigError("batch_size", f"batch size {cfg.batch_size} does not split evenly over "
                                          f"{trainer.world} processes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, final = output_paths(trainer, out_dir, name or spec.name)
    train_idx, hold_idx = dvt_data.split_holdout(len(images), cfg.holdout, cfg.seed)

    note_small_data(say, spec.name, len(train_idx), len(hold_idx), from_scratch=init is None and init_state is None)
    init_report = _start(trainer, spec, init, init_state, say)
    trainer.prepare()
    spe = C.steps_per_epoch(len(train_idx), cfg)
    step, history, partial = 0, [], (0.0, 0)
    if resume and state_path.exists():
        check_resumable(trainer, state_path, spec)
        step, history, partial, saved_init = _resume(trainer, state_path, spe, say)
        init_report = saved_init if saved_init is not None else init_report
    t0 = time.time()
    probs = _train_epochs(trainer, spec, images[train_idx], labels[train_idx], images, labels, hold_idx, cfg,
                          state_path, step, history, partial, init_report, progress and main, say, freeze)
    if main:
        if probs is None:  # resumed a finished run: nothing trained, calibrate anyway
            probs = _holdout_probs(trainer, images, hold_idx)
        meta = C.final_meta(spec, cfg, history, images=len(images), hold_idx=hold_idx, labels=labels, probs=probs,
                            seconds=time.time() - t0, device=trainer.device, world=trainer.world,
                            backend=trainer.backend, init=init_report, dataset=dataset, calibrate_to=calibrate_to)
        meta.update(extra_meta or {})
        if name is not None:
            meta["name"] = C.model_file_name(name)
        write_checkpoint(final, trainer.weights(), meta, fmt=trainer.weights_format, force=True)
        say(f"wrote {final} in {time.time() - t0:.0f} s")
        summary = summary_line(meta)
        if summary:
            say(summary)
    trainer.barrier()
    return final


def _train_epochs(trainer: Trainer, spec, x_train, y_train, images, labels, hold_idx, cfg: TrainConfig,
                  state_path: Path, step: int, history: list, partial: tuple, init_report, progress: bool,
                  say, freeze: Optional[tuple[list, int]] = None) -> Optional[np.ndarray]:
    """The epochs from ``step`` on (``history`` is extended in place); the last epoch's held-out
    probabilities (None when none was trained or nothing is held out)."""
    from dvt_core.checkpoint.files import atomic_path

    spe = C.steps_per_epoch(len(x_train), cfg)
    total, warmup = spe * cfg.epochs, int(cfg.warmup_epochs * spe)
    t0, probs = time.time(), None
    main = trainer.rank == 0

    def step_fn(xb, yb, lr, index, epoch):
        loss = trainer.step(xb, yb, lr)
        C.check_finite_loss(loss, index, epoch)
        return loss

    for epoch in range(step // spe, cfg.epochs):
        trainer.train_mode(True)
        if freeze:
            trainer.freeze(freeze[0] if epoch < freeze[1] else ())
        started = time.time()
        batches = C.epoch_batches(x_train, y_train, cfg, epoch, spec.mean, spec.std, trainer.rank, trainer.world)
        step, running, seen = C.run_epoch(step_fn, batches, cfg, epoch, step, spe, total, warmup, partial,
                                          progress=progress)
        record = {"epoch": epoch + 1, "loss": running / max(seen, 1), "seconds": round(time.time() - t0, 1),
                  "epoch_seconds": round(time.time() - started, 2)}
        if main:
            probs = _holdout_probs(trainer, images, hold_idx)  # the last epoch's also calibrates the result
            if probs is not None:
                record["holdout_accuracy"] = [float(a) for a in (probs.argmax(-1) == labels[hold_idx]).mean(1) * 100]
        history.append(record)
        say(epoch_line(spec, record, cfg.epochs))
        done = epoch + 1 == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
        if main and ((epoch + 1) % cfg.checkpoint_every == 0 or done):
            saved = {"epoch": epoch + 1, "step": step, "partial": [running, seen], "history": history,
                     "init": init_report if isinstance(init_report, dict) or init_report is None
                     else init_report.to_meta()}
            with atomic_path(state_path, force=True) as tmp:
                trainer.save_state(tmp, json.loads(json.dumps(saved)))
        if done:
            if epoch + 1 < cfg.epochs:  # say why the run is shorter than asked before its "final" weights
                say(f"stopped by --max-steps {cfg.max_steps} at step {step}, in epoch {epoch + 1} of {cfg.epochs}")
            break
    return probs
