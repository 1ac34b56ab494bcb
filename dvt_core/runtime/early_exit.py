"""True early exit, written once for every backend.

The loop, the confidence rule and the exit decisions live here; a backend supplies three small
operations (run one stage, turn logits into numpy, keep some rows of a batch and of what the next
stage reuses). Images that leave are dropped before any further work, including the resampling of
their reused features and attention logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from dvt_core.errors import InputError


@dataclass
class AdaptiveResult:
    """Per-image outcome of adaptive inference (numpy arrays, length = batch size).

    ``exit`` is the exit taken counted from 1, as the CLI prints it (``exit 2/3``); ``exit_index`` the same
    counted from 0, for indexing. ``exit_confidences`` (B, exits) holds the confidence at every exit an
    image ran, NaN at the exits it never reached.
    """

    prediction: np.ndarray  # int64 class index
    exit_index: np.ndarray  # int64, 0-based exit taken
    confidence: np.ndarray  # float32 confidence at the exit taken
    logits: np.ndarray  # float32 (B, num_classes), logits of the exit taken
    macs: np.ndarray  # int64 multiply-accumulates spent on the image
    exit_counts: np.ndarray = field(default=None)  # images per exit
    exit_confidences: Optional[np.ndarray] = field(default=None)  # float32 (B, exits), NaN: not reached

    def __len__(self) -> int:
        return len(self.prediction)

    @property
    def exit(self) -> np.ndarray:
        """int64, the exit taken counted from 1 (``exit_index + 1``), as the CLI prints it."""
        return np.asarray(self.exit_index, dtype=np.int64) + 1

    @property
    def mean_macs(self) -> float:
        return float(self.macs.mean()) if len(self.macs) else 0.0

    def to_dict(self) -> dict:
        return {
            "prediction": self.prediction.tolist(), "exit": self.exit.tolist(), "exit_index": self.exit_index.tolist(),
            "confidence": self.confidence.tolist(), "macs": self.macs.tolist(),
            "exit_counts": self.exit_counts.tolist(),
        }


def normalize_thresholds(thresholds, num_exits: int) -> np.ndarray:
    """Thresholds as float32 (num_exits,); the last exit takes every image left, whatever is given."""
    t = np.asarray(thresholds, dtype=np.float32).reshape(-1)
    if len(t) == num_exits - 1:
        t = np.concatenate([t, np.float32([-1e8])])
    if len(t) != num_exits:
        raise InputError(f"expected {num_exits - 1} or {num_exits} thresholds (one per exit), got {len(t)}")
    if np.isnan(t).any():
        raise InputError(f"thresholds must be numbers (inf: never leave at that exit), got {t.tolist()}")
    t = t.copy()
    t[-1] = -1e8
    return t


def _exit_confidence(logits: np.ndarray, kind: str) -> np.ndarray:
    """float32 confidence of each row of finite float32 ``logits``, equal to
    ``policy.confidence(policy.softmax(logits)[None], kind)[0]`` bit for bit (the thresholds were found on
    those). max-softmax without the division of every class: the largest probability is exp(0) / sum, and
    the division is correctly rounded, so ``1 / sum`` is that value exactly; at batch 1 the general path's
    checks and error-state switches cost more than the stage's own arithmetic on small models."""
    if kind != "max_softmax":
        from dvt_core.runtime.policy import confidence as confidence_of, softmax

        return confidence_of(softmax(logits)[None], kind=kind)[0]
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (np.float32(1.0) / z.sum(axis=1)).astype(np.float32, copy=False)


def run_adaptive(run_stage: Callable[[int, Any, Any], tuple[Any, Any]],
                 to_numpy: Callable[[Any], np.ndarray],
                 select: Callable[[Any, Any, np.ndarray], tuple[Any, Any]],
                 images: Any, batch_size: int, thresholds, exit_macs: Sequence[int],
                 confidence: str = "max_softmax") -> AdaptiveResult:
    """Run the cascade with real early exit.

    ``run_stage(i, images, carry) -> (logits, carry)`` runs stage ``i`` on ``images`` with what the
    previous stage left for reuse (``carry``; None for the first). ``select(images, carry, rows)``
    keeps ``rows`` (int64 numpy) of both. ``to_numpy(logits)`` gives float32 (B, classes).
    """
    num_exits = len(exit_macs)
    t = normalize_thresholds(thresholds, num_exits)
    pred = np.zeros(batch_size, np.int64)
    exit_index = np.zeros(batch_size, np.int64)
    conf_out = np.zeros(batch_size, np.float32)
    logits_out: Optional[np.ndarray] = None
    seen_conf = np.full((batch_size, num_exits), np.nan, np.float32)
    alive = np.arange(batch_size)
    carry = None
    for i in range(num_exits):
        logits, carry = run_stage(i, images, carry)
        lg = to_numpy(logits).astype(np.float32, copy=False)
        if not np.isfinite(lg).all():  # a prediction from NaN logits would be silently wrong
            bad = int((~np.isfinite(lg)).any(axis=1).sum())
            raise InputError(f"exit {i + 1} gave NaN or infinite logits for {bad} of {len(lg)} image(s): the "
                             "weights or the input are out of range; no prediction made")
        if logits_out is None:
            logits_out = np.zeros((batch_size, lg.shape[1]), np.float32)
        conf = _exit_confidence(lg, confidence)
        seen_conf[alive, i] = conf
        # the three outcomes take no boolean indexing where none is needed (batch 1 is always one of the first two)
        leave = None if i == num_exits - 1 else conf >= t[i]
        if leave is None or leave.all():
            rows, lg_left, conf_left = alive, lg, conf
        elif not leave.any():
            continue  # every image goes on, nothing is sliced
        else:
            rows, lg_left, conf_left = alive[leave], lg[leave], conf[leave]
        pred[rows] = lg_left.argmax(axis=1)
        exit_index[rows] = i
        conf_out[rows] = conf_left
        logits_out[rows] = lg_left
        if len(rows) == len(alive):
            break
        stay = np.flatnonzero(~leave)
        alive = alive[stay]
        images, carry = select(images, carry, stay)
    macs = np.asarray(exit_macs, dtype=np.int64)[exit_index]
    counts = np.bincount(exit_index, minlength=num_exits)
    return AdaptiveResult(pred, exit_index, conf_out, logits_out, macs, counts, seen_conf)
