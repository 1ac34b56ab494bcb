"""Framework-free pieces of ``dvt benchmark``: interleaved timing, the figures of one variant, and
thresholds that two runtimes apply alike. The framework side lives in ``dvt_backends.torch.benchmark``."""
from __future__ import annotations

import statistics
import time

import numpy as np

# find_thresholds puts each threshold exactly on one image's confidence. The runtimes' logits differ in
# the last bits (about 1e-6), so that image could leave in one and go on in the other; a threshold up to
# this much lower makes it leave in both, and both runtimes then take the same exits (checked, reported).
EXIT_TIE_MARGIN = 1e-5


def tie_safe_thresholds(probs: np.ndarray, thresholds: np.ndarray, margin: float = EXIT_TIE_MARGIN) -> np.ndarray:
    """``thresholds`` (max-softmax, from ``policy.find_thresholds`` on ``probs``) each lowered off the confidence
    it sits on: by ``margin``, or by half the gap to the next lower confidence among the images still there
    when that is less, so that every image takes the same exit as before and a last-bit difference between
    two runtimes cannot move the image on the threshold."""
    conf = np.asarray(probs, np.float32).max(-1)  # (exits, images), compared in float32 as the runtimes do
    out = np.asarray(thresholds, np.float32).copy()
    left = np.ones(conf.shape[1], bool)
    for k in range(conf.shape[0] - 1):
        c = conf[k][left]
        t = float(out[k])
        taken = c >= t
        if taken.any() and not taken.all():
            t -= min(margin, (t - float(c[~taken].max())) / 2)
        elif taken.any():
            t -= margin
        out[k] = t
        left[left] = c < out[k]
    return out


def time_interleaved(runs: dict, warmup: int, repeats: int) -> dict:
    """Seconds per call of every ``runs`` entry: ``warmup`` untimed rounds, then ``repeats`` timed rounds, each
    round calling every entry once, so that a change in machine load hits them alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def figures(seconds: list, n: int) -> dict:
    best, med = min(seconds), statistics.median(seconds)
    return {"ms_per_image_best": best / n * 1e3, "ms_per_image_median": med / n * 1e3,
            "images_per_s_best": n / best, "images_per_s_median": n / med}


def timed_count(batch: int, images: int) -> int:
    """Images timed at ``batch``: at least ``images`` and one batch, whole batches only."""
    n = max(batch, images)
    return n - n % batch
