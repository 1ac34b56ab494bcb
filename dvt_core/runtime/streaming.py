"""Streaming early exit over a large set: one queue per stage, full batches at every stage.

Per-batch early exit (:func:`dvt_core.runtime.early_exit.run_adaptive`) runs each later stage on the few
images of *one* input batch that go on (at a 60 / 25 / 15 % split and batch 64, stage 3 sees about
ten images). Here the images that go on are queued per stage, with their carried features and
relation logits, and a stage runs once its queue holds a full batch, gathered from several input
batches; whatever is left runs at the end. Every image takes the same exit with the same
prediction as in per-batch early exit (each image's arithmetic does not depend on its batch
neighbours, up to float rounding), and results come back in input order.

Backend-neutral: the engine drives the model's runtime (dvt_core.runtime.contract: ``run_stage``,
``select``, ``join``, ``to_tensor``, ``to_numpy``, ``inference``); each stage run is the shared step
:func:`dvt_core.runtime.early_exit.exit_step`.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from dvt_core.runtime.contract import backend_of
from dvt_core.runtime.early_exit import AdaptiveResult, exit_step, normalize_thresholds
from dvt_core.errors import InputError


class _Collector:
    def __init__(self):
        self.ids, self.pred, self.exit, self.conf, self.logits = [], [], [], [], []
        self.reached = []  # (ids, stage, confidences) of every stage run: each image's per-exit confidences

    def note(self, ids, stage: int, conf):
        self.reached.append((ids, stage, conf))

    def add(self, ids, exit_index, lg, conf):
        self.ids.append(ids)
        self.pred.append(lg.argmax(axis=1).astype(np.int64))
        self.exit.append(np.full(len(ids), exit_index, np.int64))
        self.conf.append(conf.astype(np.float32, copy=False))
        self.logits.append(lg)

    def result(self, exit_macs, num_classes: Optional[int]) -> AdaptiveResult:
        num_exits = len(exit_macs)
        if not self.ids:
            return AdaptiveResult(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32),
                                  np.zeros((0, num_classes or 0), np.float32), np.zeros(0, np.int64),
                                  np.zeros(num_exits, np.int64), np.zeros((0, num_exits), np.float32))
        order = np.argsort(np.concatenate(self.ids), kind="stable")
        exit_index = np.concatenate(self.exit)[order]
        reached = np.full((len(order), num_exits), np.nan, np.float32)
        for ids, stage, conf in self.reached:  # ids are 0..N-1 in input order
            reached[ids, stage] = conf
        return AdaptiveResult(np.concatenate(self.pred)[order], exit_index, np.concatenate(self.conf)[order],
                              np.concatenate(self.logits)[order],
                              np.asarray(exit_macs, dtype=np.int64)[exit_index],
                              np.bincount(exit_index, minlength=num_exits), reached)


class StreamingAdaptive:
    """The engine: ``feed`` input batches (in order), then ``finish`` for the merged result.

    A stage after the first runs when its queue holds at least ``batch_size`` images (all of them:
    fewer than two batches), and at ``finish`` on what is left, stage by stage.
    """

    def __init__(self, model, thresholds, batch_size: int, confidence: str = "max_softmax"):
        if batch_size < 1:
            raise InputError(f"batch size must be 1 or more, got {batch_size}")
        self.model, self.runtime = model, backend_of(model)
        self.exit_macs = model.exit_macs
        self.num_exits = len(self.exit_macs)
        self.t = normalize_thresholds(thresholds, self.num_exits)
        self.batch_size = batch_size
        self.confidence = confidence
        self.queues: list[list] = [[] for _ in range(self.num_exits)]  # per stage: [(ids, images, carry)]
        self.queued = [0] * self.num_exits
        self.seen = 0
        self.num_classes: Optional[int] = None
        self.out = _Collector()
        self.stage_runs = [0] * self.num_exits  # how many times each stage ran (for tests and reports)

    def feed(self, images) -> None:
        """One input batch (the backend's tensor): runs stage 1, then every later stage that is full."""
        n = int(images.shape[0])
        if n == 0:
            return
        ids = np.arange(self.seen, self.seen + n)
        self.seen += n
        self._run(0, ids, images, None)

    def finish(self) -> AdaptiveResult:
        for i in range(1, self.num_exits):
            if self.queued[i]:
                self._drain(i)
        return self.out.result(self.exit_macs, self.num_classes)

    # ---- internals ----------------------------------------------------------------------------
    def _drain(self, i: int) -> None:
        parts = self.queues[i]
        self.queues[i], self.queued[i] = [], 0
        ids = np.concatenate([p[0] for p in parts])
        images, carry = parts[0][1:] if len(parts) == 1 else self.runtime.join([p[1:] for p in parts])
        self._run(i, ids, images, carry)

    def _run(self, i: int, ids: np.ndarray, images, carry) -> None:
        self.stage_runs[i] += 1
        lg, conf, leave, images, carry = exit_step(self.runtime, self.model, i, images, carry, self.t,
                                                   self.confidence)
        self.num_classes = lg.shape[1]
        self.out.note(ids, i, conf)
        if leave is True:
            self.out.add(ids, i, lg, conf)
            return
        if leave is not False:
            self.out.add(ids[leave], i, lg[leave], conf[leave])
            ids = ids[~leave]
        self.queues[i + 1].append((ids, images, carry))
        self.queued[i + 1] += len(ids)
        if self.queued[i + 1] >= self.batch_size:
            self._drain(i + 1)


def stream_adaptive(model, batches: Iterable[np.ndarray], thresholds, batch_size: int,
                    confidence: str = "max_softmax") -> AdaptiveResult:
    """Early exit over an iterable of float32 numpy batches (already normalised), in input order."""
    engine = StreamingAdaptive(model, thresholds, batch_size, confidence)
    runtime = engine.runtime
    with runtime.inference(model):
        for x in batches:
            engine.feed(runtime.to_tensor(model, x))
        return engine.finish()


def prefetch(items: Sequence, load: Callable[[Any], np.ndarray], batch_size: int, workers: int = 2,
             ahead: int = 2) -> Iterator[np.ndarray]:
    """Batches of ``load(item)`` stacked in input order, decoded by ``workers`` threads while the
    caller computes (up to ``ahead`` batches in flight). Image decoding releases the GIL."""
    if workers < 1:
        for s in range(0, len(items), batch_size):
            yield np.stack([load(it) for it in items[s:s + batch_size]])
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        starts = iter(range(0, len(items), batch_size))
        for s in starts:
            pending.append(pool.map(load, items[s:s + batch_size]))
            if len(pending) > ahead:
                yield np.stack(list(pending.pop(0)))
        while pending:
            yield np.stack(list(pending.pop(0)))
