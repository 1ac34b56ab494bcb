"""Backend-neutral evaluation: per-exit probabilities of a data set, anytime accuracy, budget curves.

A model is driven through its backend's ``forward_numpy`` / ``adaptive_numpy`` (the backend contract,
``dvt_core.backend``), so the same code evaluates a model of any backend.
"""
from __future__ import annotations

import numpy as np

from . import data as dvt_data
from . import policy
from .backend import backend_of


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
             progress: bool = False):
    """True early exit over uint8 ``images`` in batches; one merged :class:`AdaptiveResult`. Without
    ``thresholds``, the default operating point stored in the model's checkpoint."""
    from tqdm.auto import tqdm

    from .early_exit import AdaptiveResult
    from .operating_point import model_thresholds

    thresholds = model_thresholds(model, thresholds)
    spec = model.spec
    run = backend_of(model).adaptive_numpy
    parts = []
    for s in tqdm(range(0, len(images), batch_size), desc="adaptive", unit="batch", disable=not progress,
                  leave=False):
        parts.append(run(model, dvt_data.normalize(images[s:s + batch_size], spec.mean, spec.std), thresholds,
                         confidence))
    cat = lambda f: np.concatenate([getattr(p, f) for p in parts])
    return AdaptiveResult(cat("prediction"), cat("exit_index"), cat("confidence"), cat("logits"), cat("macs"),
                          sum(p.exit_counts for p in parts))
