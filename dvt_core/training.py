"""Framework-agnostic parts of training: the configuration, the learning-rate schedule, the data feed.

A backend's trainer (``backends/torch/train.py``) reads these, so a run's every number is recorded
in one dataclass and saved with its checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from . import data


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 256  # global batch (split across processes when distributed)
    lr: float = 1e-3  # peak AdamW learning rate for the global batch
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.0
    holdout: int = 5000  # training images held out (never trained on) to calibrate thresholds
    augment: bool = True
    pad: int = 2  # random-crop padding in pixels
    seed: int = 0
    checkpoint_every: int = 1  # epochs between checkpoints (always at the end)
    max_steps: Optional[int] = None  # stop early after this many steps (smoke tests)
    grad_clip: Optional[float] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


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
