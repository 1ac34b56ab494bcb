"""Backend-neutral evaluation: per-exit probabilities of a data set, anytime accuracy, budget curves.

A model is driven through its backend's ``forward_numpy`` / ``adaptive_numpy`` (the backend contract,
``dvt_core.runtime.contract``), so the same code evaluates a model of any backend.
"""
from __future__ import annotations

import numpy as np

from dvt_core.data import sources as dvt_data
from dvt_core.runtime import policy
from dvt_core.runtime.contract import backend_of


def exit_probs(model, images: np.ndarray, batch_size: int = 500, progress: bool = False,
               desc: str = "evaluate") -> np.ndarray:
    """Softmax probabilities of every exit for uint8 ``images``: (exits, N, classes) float32."""
    from tqdm.auto import tqdm

    spec = model.spec
    fwd = backend_of(model).forward_numpy
    chunks = []
    for s in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        x = dvt_data.normalize(images[s:s + batch_size], spec.mean, spec.std)
        chunks.append(np.stack([policy.softmax(lg) for lg in fwd(model, x)]))
    return np.concatenate(chunks, axis=1).astype(np.float32)


def adaptive(model, images: np.ndarray, thresholds=None, batch_size: int = 500, confidence: str = "max_softmax",
             progress: bool = False, streaming: bool = True):
    """True early exit over uint8 ``images``; one :class:`AdaptiveResult` in input order. Without
    ``thresholds``, the default operating point stored in the model's checkpoint.

    ``streaming`` (the default): the images that go on are queued per stage and the later stages run
    on full batches gathered across input batches (dvt_core.runtime.streaming); the same exits and
    predictions as ``streaming=False``, which runs every input batch through the cascade on its own.
    """
    from tqdm.auto import tqdm

    from dvt_core.runtime.operating_point import model_thresholds

    thresholds = model_thresholds(model, thresholds)
    spec = model.spec
    starts = tqdm(range(0, len(images), batch_size), desc="adaptive", unit="batch", disable=not progress,
                  leave=False)
    batches = (dvt_data.normalize(images[s:s + batch_size], spec.mean, spec.std) for s in starts)
    return _run_batches(model, batches, thresholds, batch_size, confidence, streaming)


def adaptive_files(model, files, thresholds=None, batch_size: int = 64, confidence: str = "max_softmax",
                   workers: int = 2, streaming: bool = True):
    """True early exit over image files, decoded and resized by ``workers`` threads while the model
    runs (``dvt_data.load_image``); one :class:`AdaptiveResult` in the order of ``files``."""
    from dvt_core.runtime.operating_point import model_thresholds

    thresholds = model_thresholds(model, thresholds)
    spec = model.spec

    def load(path):
        return dvt_data.normalize(dvt_data.load_image(path, spec.img_size, spec.in_chans)[None], spec.mean,
                                  spec.std)[0]

    from dvt_core.runtime.streaming import prefetch

    return _run_batches(model, prefetch(list(files), load, batch_size, workers), thresholds, batch_size,
                        confidence, streaming)


def _run_batches(model, batches, thresholds, batch_size, confidence, streaming):
    from dvt_core.runtime.early_exit import AdaptiveResult
    from dvt_core.runtime.streaming import stream_adaptive

    if streaming:
        return stream_adaptive(model, batches, thresholds, batch_size, confidence)
    run = backend_of(model).adaptive_numpy
    parts = [run(model, x, thresholds, confidence) for x in batches]
    if not parts:
        return stream_adaptive(model, [], thresholds, batch_size, confidence)
    cat = lambda f: np.concatenate([getattr(p, f) for p in parts])
    reached = None if any(p.exit_confidences is None for p in parts) else cat("exit_confidences")
    return AdaptiveResult(cat("prediction"), cat("exit_index"), cat("confidence"), cat("logits"), cat("macs"),
                          sum(p.exit_counts for p in parts), reached)
