"""True early exit, written once for every backend.

The step (run a stage, score it, decide who leaves, keep the rest: :func:`exit_step`), the confidence
rule and the per-batch loop live here, driven through the runtime contract only
(dvt_core.runtime.contract: ``run_stage``, ``to_numpy``, ``select``). Images that leave are dropped
before any further work, including the resampling of their reused features and attention logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

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


def exit_confidence(logits: np.ndarray, kind: str) -> np.ndarray:
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


def exit_step(runtime, model, index: int, images, carry, thresholds: np.ndarray,
              confidence: str = "max_softmax") -> tuple[np.ndarray, np.ndarray, Any, Any, Any]:
    """One stage of early exit, the step every loop shares (per-batch :func:`run_adaptive`, streaming,
    the serving scheduler): run stage ``index`` through the runtime contract, take its logits to numpy,
    score them, decide who leaves and keep the rows of those who go on.

    Returns ``(logits, confidences, leave, images, carry)``: float32 logits (B, classes) and confidences
    (B,) of every image run; ``leave`` is True when every image leaves here (always at the last exit),
    False when none does, else a boolean mask (B,); ``images`` and ``carry`` are those of the images that
    go on (only sliced when some leave; carry None after the last stage). ``thresholds`` come from
    :func:`normalize_thresholds`: (exits,), or (exits, B) when each image has its own (the service's
    per-request operating points). Batch 1 takes no boolean indexing and no slicing."""
    logits, carry = runtime.run_stage(model, index, images, carry)
    lg = runtime.to_numpy(logits).astype(np.float32, copy=False)
    if not np.isfinite(lg).all():  # a prediction from NaN logits would be silently wrong
        bad = int((~np.isfinite(lg)).any(axis=1).sum())
        raise InputError(f"exit {index + 1} gave NaN or infinite logits for {bad} of {len(lg)} image(s): the "
                         "weights or the input are out of range; no prediction made")
    conf = exit_confidence(lg, confidence)
    if index == len(thresholds) - 1:
        return lg, conf, True, images, None
    leave = conf >= thresholds[index]
    if len(leave) == 1:  # one image: a plain bool, without the two reductions
        return lg, conf, bool(leave[0]), images, carry
    if leave.all():
        return lg, conf, True, images, carry
    if not leave.any():
        return lg, conf, False, images, carry
    images, carry = runtime.select(images, carry, np.flatnonzero(~leave))
    return lg, conf, leave, images, carry


def run_adaptive(runtime, model, images, thresholds, confidence: str = "max_softmax") -> AdaptiveResult:
    """Per-batch early exit of a tensor batch ``images`` (the runtime's own), inside its inference
    context: each stage runs on the images still there (:func:`exit_step`)."""
    exit_macs = model.exit_macs
    num_exits, batch_size = len(exit_macs), int(images.shape[0])
    t = normalize_thresholds(thresholds, num_exits)
    pred = np.zeros(batch_size, np.int64)
    exit_index = np.zeros(batch_size, np.int64)
    conf_out = np.zeros(batch_size, np.float32)
    logits_out: Optional[np.ndarray] = None
    seen_conf = np.full((batch_size, num_exits), np.nan, np.float32)
    alive = np.arange(batch_size)
    carry = None
    for i in range(num_exits):
        lg, conf, leave, images, carry = exit_step(runtime, model, i, images, carry, t, confidence)
        if logits_out is None:
            logits_out = np.zeros((batch_size, lg.shape[1]), np.float32)
        everyone = len(alive) == batch_size  # then a slice, not an index array: cheaper at batch 1
        seen_conf[slice(None) if everyone else alive, i] = conf
        if leave is False:
            continue  # every image goes on, nothing was sliced
        if leave is True:
            rows, lg_left, conf_left = (slice(None) if everyone else alive), lg, conf
        else:
            rows, lg_left, conf_left = alive[leave], lg[leave], conf[leave]
        pred[rows] = lg_left.argmax(axis=1)
        exit_index[rows] = i
        conf_out[rows] = conf_left
        logits_out[rows] = lg_left
        if leave is True:
            break
        alive = alive[~leave]
    macs = np.asarray(exit_macs, dtype=np.int64)[exit_index]
    counts = np.bincount(exit_index, minlength=num_exits)
    return AdaptiveResult(pred, exit_index, conf_out, logits_out, macs, counts, seen_conf)
