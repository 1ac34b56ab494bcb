"""Framework-agnostic parts of training: the configuration, the learning-rate schedule, the data feed.

A backend's trainer (``dvt_backends/torch/train.py``) reads these, so a run's every number is recorded
in one dataclass and saved with its checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np

from dvt_core.checkpoint.metadata import add_meta_rule
from dvt_core.data import sources as data
from dvt_core.data.datasets import FOLDER_HOLDOUT, HOLDOUT, HOLDOUT_SEED, is_fashion_mnist  # noqa: F401
from dvt_core.errors import ArgumentError, ConfigError, DVTError, TrainingDiverged
from dvt_core.schema import MAX_SEED, want_dict

# upper bounds of TrainConfig.validate (far beyond any real run; they bound what a hostile record can ask for)
MAX_EPOCHS = 1_000_000
MAX_BATCH = 1 << 20
MAX_PAD = 1024
MAX_COUNT = 1 << 40  # steps, held-out images


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 256  # global batch (split across processes when distributed)
    lr: float = 1e-3  # peak AdamW learning rate for the global batch
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.0
    holdout: Union[int, float] = HOLDOUT  # training images (a count, or a fraction < 1) held out to calibrate
    augment: bool = True
    pad: int = 2  # random-crop padding in pixels
    seed: int = HOLDOUT_SEED  # also picks the held-out part
    checkpoint_every: int = 1  # epochs between checkpoints (always at the end)
    max_steps: Optional[int] = None  # stop early after this many steps (smoke tests)
    grad_clip: Optional[float] = None

    def validate(self) -> "TrainConfig":
        """``self`` when every field lies in its range; else :class:`~dvt_core.errors.ConfigError` naming
        the field, the rule and the value. The one set of rules: ``dvt train``'s options, the Python API and
        the training record inside an untrusted checkpoint (:func:`check_train_config`) are all checked by it. The
        upper bounds keep a hostile record from asking for absurd work, not any real run."""
        _check_int(self, "epochs", low=1, high=MAX_EPOCHS)
        _check_int(self, "batch_size", low=1, high=MAX_BATCH)
        _check_real(self, "lr", low=0.0, open_low=True)  # no upper bound: a huge rate diverges, reported by step
        _check_real(self, "min_lr", low=0.0)
        _check_real(self, "weight_decay", low=0.0)
        _check_real(self, "warmup_epochs", low=0.0, high=MAX_EPOCHS, closed_high=True)
        _check_real(self, "label_smoothing", low=0.0, high=1.0)
        _check_int(self, "pad", low=0, high=MAX_PAD)
        _check_int(self, "seed", low=0, high=MAX_SEED)
        _check_int(self, "checkpoint_every", low=1, high=MAX_EPOCHS)
        if self.max_steps is not None:
            _check_int(self, "max_steps", low=1, high=MAX_COUNT)
        if self.grad_clip is not None:
            _check_real(self, "grad_clip", low=0.0, open_low=True)
        if not isinstance(self.augment, (bool, np.bool_)):
            raise ConfigError("augment", f"augment must be True or False, got {self.augment!r}")
        h = self.holdout
        if isinstance(h, bool) or not isinstance(h, (int, float, np.integer, np.floating)) or not math.isfinite(h):
            raise ConfigError("holdout", f"holdout must be a count or a fraction below 1, got {h!r}")
        if h < 0 or (not float(h).is_integer() and h >= 1) or h > MAX_COUNT:
            raise ConfigError("holdout", f"holdout must be a count (0 or more) or a fraction in [0, 1), got {h:g}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def check_train_config(cfg, where: str = "training", error=ArgumentError):
    """``cfg`` (a :class:`TrainConfig`) if its own rules (:meth:`TrainConfig.validate`, the one set) pass;
    else ``error`` saying ``where`` and the rule broken. Returns ``cfg``."""
    try:
        return cfg.validate()
    except ConfigError as exc:
        raise error(f"{where}: {exc}") from None


def check_train_record(value, where: str, error, exits=None) -> None:
    """A checkpoint's ``train`` metadata (:meth:`TrainConfig.to_dict`), checked by the same rules."""
    want_dict(value, where, error)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    check_train_config(TrainConfig.from_dict({k: v for k, v in value.items() if k in known}), where, error)


add_meta_rule("train", check_train_record)


def _check_int(cfg, field: str, low: int, high: int) -> None:
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(field, f"{field} must be a whole number, got {value!r}")
    if value < low:
        raise ConfigError(field, f"{field} must be at least {low}, got {value}")
    if value > high:
        raise ConfigError(field, f"{field} must be at most {high}, got {value}")


def _check_real(cfg, field: str, low: float, open_low: bool = False, high: Optional[float] = None,
                closed_high: bool = False) -> None:
    """``low <= value`` (``low < value`` when ``open_low``) and ``value < high`` (``<=`` when ``closed_high``),
    finite."""
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(field, f"{field} must be a number, got {value!r}")
    top = "" if high is None else f" and {'at most' if closed_high else 'below'} {high:g}"
    rule = f"{'above' if open_low else 'at least'} {low:g}{top}"
    over = high is not None and (value > high if closed_high else value >= high)
    bad = not math.isfinite(value) or value < low or (open_low and value == low) or over
    if bad:
        raise ConfigError(field, f"{field} must be a finite number {rule}, got {value:g}")


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def model_file_name(name) -> str:
    """``name`` (a folder's, ``--name``, a spec's) as a file-name stem that stays inside its folder: runs of
    characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``, leading dots and
    separators go, at most 64 characters; ``model`` when nothing is left."""
    stem = _UNSAFE.sub("_", str(name)).strip("._-")[:64].rstrip("._-")
    return stem or "model"


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``floor`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def epoch_batches(images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, epoch: int, mean, std,
                  rank: int = 0, world: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's normalised, augmented batches of one epoch.

    Every process draws the same permutation (seeded by seed and epoch) and takes its own
    interleaved share of each global batch, so a run with N processes sees the same images per step
    as a run with one.
    """
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(len(images))
    per_rank = cfg.batch_size // world
    steps = len(order) // cfg.batch_size  # drop the last partial batch: equal shares for every process
    aug_rng = np.random.default_rng([cfg.seed, epoch, rank, 7])
    for s in range(steps):
        idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size][rank::world][:per_rank]
        x = images[idx]
        if cfg.augment:
            x = data.augment(x, aug_rng, pad=cfg.pad, flip=True)
        yield data.normalize(x, mean, std), labels[idx]


def steps_per_epoch(n: int, cfg: TrainConfig) -> int:
    return n // cfg.batch_size


def resolve_holdout(cfg: TrainConfig, n: int) -> TrainConfig:
    """``cfg`` with a fractional ``holdout`` turned into the count of images it keeps out of ``n`` (the same
    split: :func:`dvt_core.data.sources.split_holdout` draws it from ``n`` and the seed alone)."""
    h = cfg.holdout
    if isinstance(h, bool) or not isinstance(h, (int, float, np.integer, np.floating)):
        raise DVTError(f"holdout must be a count or a fraction, got {h!r}")
    if isinstance(h, (float, np.floating)) and not float(h).is_integer():
        if not 0.0 <= h < 1.0:
            raise DVTError(f"a fractional holdout must lie in [0, 1), got {h:g}")
        count = int(round(float(h) * n))
    else:
        count = int(h)
    if not 0 <= count <= n:
        raise DVTError(f"holdout {count} is not between 0 and the {n} images")
    return dataclasses.replace(cfg, holdout=count)


def check_finite_loss(loss: float, step: int, epoch: int) -> None:
    """TrainingDiverged naming the step when ``loss`` is NaN or infinite."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"training diverged: the loss is {loss} at step {step + 1} (epoch {epoch + 1}); "
                               "no weights written for it. Lower --lr, or raise --warmup-epochs")


def dataset_record(source, images: int, holdout: int, seed: int) -> dict:
    """``meta["dataset"]``: where a model was trained and which part of it was held out, so evaluation and
    calibration can default to the same images. ``source`` is ``"fashion-mnist"``, an image folder's path,
    or None (arrays handed to the Python API); ``name`` is the data set's name (the folder's own name),
    ``path`` the folder's absolute path (None for Fashion-MNIST), ``images`` the training split's size,
    ``holdout`` the held-out count drawn with ``seed`` by :func:`dvt_core.data.sources.split_holdout`."""
    from pathlib import Path

    if source is None:
        name, path = None, None
    elif is_fashion_mnist(source):
        name, path = "fashion-mnist", None
    else:
        resolved = Path(source).resolve()
        name, path = resolved.name, str(resolved)
    return {"name": name, "path": path, "split": "train", "images": int(images), "holdout": int(holdout),
            "seed": int(seed)}


def final_meta(spec, cfg: TrainConfig, history: list, images: int, hold_idx, labels, probs, seconds: float,
               device: str, world: int, backend: str, init=None, dataset=None,
               calibrate_to: Optional[tuple] = None) -> dict:
    """The metadata a trainer writes with its final weights, calibrated on the held-out part when there is
    one (``probs``: the exits' probabilities on it), so the default operating point is ready to use.
    ``dataset`` is where the images came from (see :func:`dataset_record`); ``calibrate_to`` ``(accuracy,
    rule)``: the default operating point is the cheapest reaching that held-out accuracy, not the last exit's."""
    from dvt_core.model.macs import exit_macs
    from dvt_core.runtime.operating_point import DEFAULT_RULE, calibration_meta

    costs = [int(m) for m in exit_macs(spec)]
    meta = {"arch": spec.name, "spec": spec.to_dict(), "exit_macs": costs, "train": cfg.to_dict(),
            "history": history, "holdout_indices_seed": cfg.seed, "holdout": int(len(hold_idx)),
            "dataset_images": int(images), "train_seconds": round(seconds, 1), "device": device,
            "world_size": world, "backend": backend,
            "dataset": dataset_record(dataset, images, len(hold_idx), cfg.seed)}
    if init is not None:
        meta["init"] = init if isinstance(init, dict) else init.to_meta()
    if probs is not None and len(hold_idx):
        target, rule = calibrate_to if calibrate_to else (None, DEFAULT_RULE)
        meta.update(calibration_meta(probs, labels[hold_idx], costs, target=target, rule=rule,
                                     data={"split": "holdout", "holdout": int(len(hold_idx)), "seed": cfg.seed}))
    return meta


def run_epoch(step_fn, batches: Iterator, cfg: TrainConfig, epoch: int, step: int, steps_in_epoch: int,
              total_steps: int, warmup_steps: int, partial: tuple = (0.0, 0), progress: bool = False):
    """One epoch of training, the same in every backend: ``step_fn(x, y, lr, step, epoch) -> loss`` per batch
    at the cosine schedule's learning rate, resuming ``step - epoch * steps_in_epoch`` batches in (skipped
    with the same draws as the uninterrupted run; ``partial`` is the resumed epoch's (loss sum, images)),
    stopping at ``cfg.max_steps``. Returns ``(step, loss sum, images seen)``."""
    from tqdm.auto import tqdm

    skip = step - epoch * steps_in_epoch  # batches of this epoch already trained on before a resume
    for _ in range(skip):
        next(batches)  # the same draws (augmentation included) as the uninterrupted run
    bar = tqdm(batches, total=steps_in_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
               disable=not progress, leave=True)  # each epoch's bar stays: a short epoch is seen too
    running, seen = partial if skip else (0.0, 0)
    for xb, yb in bar:
        lr = cosine_lr(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
        loss = step_fn(xb, yb, lr, step, epoch)
        step += 1
        running += loss * len(yb)
        seen += len(yb)
        bar.set_postfix(loss=f"{running / seen:.4f}", lr=f"{lr:.2e}")
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
    return step, running, seen
