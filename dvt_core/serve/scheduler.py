"""The per-stage batching scheduler behind ``dvt serve``: one queue per stage, one worker thread.

Requests (one normalised image each) wait in stage 1's queue; the worker runs stage 1 on them once
the queue holds ``max_batch`` images or its oldest image has waited ``max_wait_ms``. The images that
go on wait in stage 2's queue with their carried features and relation logits, and run when that
queue is full, its deadline passes, or nothing earlier is left that could join them (waiting longer
could only add latency); and so on to the last stage. Later stages go first when several are ready:
their images are the oldest. At low load every image runs almost at once; under load the worker is
busy while requests arrive, so every stage runs on fuller batches.

Framework-free: the model is driven only through the runtime contract (``backend_of(model)``:
``run_stage``, ``select``, ``join``, ``to_tensor``, ``to_numpy``, ``inference``), on the worker
thread, inside the backend's inference context. Each image's arithmetic does not depend on its batch
neighbours, so an image gets the exit and prediction of ``model.adaptive`` (up to float rounding).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from dvt_core.errors import DVTError, InputError
from dvt_core.runtime.early_exit import exit_step, normalize_thresholds


class QueueFullError(DVTError):
    """The service holds ``queue_limit`` images already: the request is refused at once (HTTP 503)."""


class SchedulerClosedError(DVTError):
    """The scheduler is shutting down and takes no new image."""


@dataclass
class Prediction:
    """One image's outcome: class index, confidence at the exit taken, the stage that answered it
    (``stage_index``, counted from 0, for indexing) and its MACs. ``exit`` is the same exit counted from 1,
    as the CLI and HTTP answers say it."""

    class_index: int
    confidence: float
    stage_index: int
    macs: int

    @property
    def exit(self) -> int:
        return self.stage_index + 1


class BudgetController:
    """Holds the average MACs per image at ``budget`` under load, by moving every threshold (but the
    last) by one shared ``shift``: after each ``window`` images answered, ``shift`` moves against the
    relative error of their average MACs (a higher threshold keeps more images for later, costlier
    exits, so the average is monotone in ``shift``: integral control converges)."""

    def __init__(self, base: np.ndarray, exit_macs: Sequence[int], budget: float, window: int = 64,
                 gain: float = 0.05):
        if not exit_macs[0] <= budget <= exit_macs[-1]:
            raise InputError(f"a budget of {budget:g} MACs is outside what this model can spend "
                             f"({exit_macs[0]} to {exit_macs[-1]} MACs per image)")
        self.base, self.budget, self.window, self.gain = base.copy(), float(budget), int(window), float(gain)
        self.shift = 0.0
        self._macs, self._count = 0, 0

    def thresholds(self) -> np.ndarray:
        t = self.base.copy()
        t[:-1] = np.clip(t[:-1] + self.shift, 0.0, 1.0 + 1e-6)  # confidences lie in [0, 1]
        return t

    def observe(self, macs: int, images: int) -> Optional[np.ndarray]:
        """Count ``images`` answered at ``macs`` each; the new thresholds when a window is complete."""
        self._macs += macs * images
        self._count += images
        if self._count < self.window:
            return None
        error = (self._macs / self._count - self.budget) / self.budget
        self.shift = float(np.clip(self.shift - self.gain * error, -1.0, 1.0))
        self._macs, self._count = 0, 0
        return self.thresholds()


@dataclass
class _Batch:
    """Images waiting in one stage's queue: their futures, their tensor batch and carry (stage 1: numpy
    images, no carry), and when they entered the queue."""

    futures: list
    images: Any
    carry: Any
    since: float


class StageScheduler:
    """Batches single images through a model's stages; :meth:`submit` returns a Future of a :class:`Prediction`.

    ``observer`` (optional) is called on the worker thread as ``observer(stage, batch_size, exits)``
    after each stage run, ``exits`` being the 0-based exits taken by the images that left there
    (what :mod:`dvt_core.serve.metrics` counts).
    """

    def __init__(self, model, thresholds, max_batch: int = 32, max_wait_ms: float = 2.0, queue_limit: int = 256,
                 confidence: str = "max_softmax", observer: Optional[Callable[[int, int, np.ndarray], None]] = None,
                 adapt_budget: Optional[float] = None, adapt_window: int = 64):
        from dvt_core.runtime.contract import backend_of

        if max_batch < 1:
            raise InputError(f"max batch must be 1 or more, got {max_batch}")
        if max_wait_ms < 0:
            raise InputError(f"max wait must be 0 ms or more, got {max_wait_ms}")
        if queue_limit < 1:
            raise InputError(f"queue limit must be 1 or more, got {queue_limit}")
        self.model = model
        self.backend = backend_of(model)
        self.exit_macs = [int(m) for m in model.exit_macs]
        self.num_exits = len(self.exit_macs)
        self.thresholds = normalize_thresholds(thresholds, self.num_exits)
        # with ``adapt_budget``: thresholds moved at run time to hold that average MACs (they start as given)
        self.controller = None if adapt_budget is None else BudgetController(self.thresholds, self.exit_macs,
                                                                             adapt_budget, adapt_window)
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.queue_limit = int(queue_limit)
        self.confidence = confidence
        self.observer = observer
        self.queues: list[list[_Batch]] = [[] for _ in range(self.num_exits)]
        self.stage_runs = [0] * self.num_exits
        self._pending = 0  # images submitted and not answered yet, all stages together
        self._cond = threading.Condition()
        self._closing = False
        self._failure: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._work, name="dvt-serve-worker", daemon=True)
        self._thread.start()

    # ---- the caller's side -----------------------------------------------------------------------
    def submit(self, image: np.ndarray) -> Future:
        """Queue one normalised float32 image (C, H, W); QueueFullError at once when ``queue_limit``
        images are in the service, SchedulerClosedError once :meth:`close` began."""
        future: Future = Future()
        future.set_running_or_notify_cancel()  # a caller that gives up cannot cancel it under the worker
        with self._cond:
            if self._closing or self._failure is not None:
                raise SchedulerClosedError("the service is shutting down")
            if self._pending >= self.queue_limit:
                raise QueueFullError(f"the queue is full ({self.queue_limit} images waiting)")
            self._pending += 1
            self.queues[0].append(_Batch([future], image, None, time.monotonic()))
            self._cond.notify()
        return future

    def depths(self) -> list[int]:
        """Images waiting in each stage's queue now."""
        with self._cond:
            return [sum(len(b.futures) for b in q) for q in self.queues]

    @property
    def alive(self) -> bool:
        """True while the worker runs and no model failure has stopped it."""
        return self._thread.is_alive() and self._failure is None

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending

    def close(self, timeout: Optional[float] = None) -> None:
        """Take no new image, answer every image already queued (the worker runs them, stage by
        stage, without waiting for deadlines), then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- the worker ------------------------------------------------------------------------------
    def _ready_stage(self, now: float) -> tuple[Optional[int], Optional[float]]:
        """(the stage to run now, or None; when to look again if none is ready)."""
        wake = None
        for i in reversed(range(self.num_exits)):
            q = self.queues[i]
            if not q:
                continue
            waiting = sum(len(b.futures) for b in q)
            deadline = q[0].since + self.max_wait
            earlier_empty = i > 0 and not any(self.queues[:i])
            if waiting >= self.max_batch or now >= deadline or earlier_empty or self._closing:
                return i, None
            wake = deadline if wake is None else min(wake, deadline)
        return None, wake

    def _take(self, i: int) -> list[_Batch]:
        """Up to ``max_batch`` images from the head of stage ``i``'s queue (a waiting batch is split
        when only part of it fits)."""
        q, taken, room = self.queues[i], [], self.max_batch
        while q and room:
            head = q[0]
            if len(head.futures) <= room:
                taken.append(q.pop(0))
                room -= len(head.futures)
            else:
                rows = np.arange(room)
                rest = np.arange(room, len(head.futures))
                taken.append(_Batch(head.futures[:room], *self._rows(i, head, rows), head.since))
                q[0] = _Batch(head.futures[room:], *self._rows(i, head, rest), head.since)
                room = 0
        return taken

    def _rows(self, i: int, batch: _Batch, rows: np.ndarray) -> tuple[Any, Any]:
        if i == 0:
            return batch.images, None  # stage 1 entries hold one image each: never split
        return self.backend.select(batch.images, batch.carry, rows)

    def _work(self) -> None:
        try:
            with self.backend.inference(self.model):
                while True:
                    with self._cond:
                        while True:
                            if self._closing and self._pending == 0:
                                return
                            stage, wake = self._ready_stage(time.monotonic())
                            if stage is not None:
                                parts = self._take(stage)
                                break
                            self._cond.wait(None if wake is None else max(0.0, wake - time.monotonic()))
                    self._run(stage, parts)
        except BaseException as exc:  # a model failure answers every waiting request instead of hanging them
            self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            self._failure = exc
            for q in self.queues:
                for b in q:
                    for f in b.futures:
                        f.set_exception(exc)
                q.clear()
            self._pending = 0

    def _run(self, i: int, parts: Sequence[_Batch]) -> None:
        b, model = self.backend, self.model
        futures = [f for p in parts for f in p.futures]
        if i == 0:
            images, carry = b.to_tensor(model, np.stack([p.images for p in parts])), None
        elif len(parts) == 1:
            images, carry = parts[0].images, parts[0].carry
        else:
            images, carry = b.join([(p.images, p.carry) for p in parts])
        try:
            lg, conf, leave, images, carry = exit_step(b, model, i, images, carry, self.thresholds, self.confidence)
        except Exception as exc:  # this batch fails alone; the service goes on
            self._answer(futures, exc=exc)
            return
        self.stage_runs[i] += 1
        done = np.arange(len(futures)) if leave is True else np.flatnonzero(leave)
        if self.observer is not None:  # counted before anyone is answered: a client then reads it in metrics
            self.observer(i, len(futures), np.full(len(done), i, np.int64))
        if self.controller is not None and len(done):
            adapted = self.controller.observe(self.exit_macs[i], len(done))
            if adapted is not None:
                self.thresholds = adapted  # the worker alone reads them: the next stage run uses them
        pred = lg.argmax(axis=1)
        self._answer([futures[r] for r in done],
                     [Prediction(int(pred[r]), float(conf[r]), i, self.exit_macs[i]) for r in done])
        if len(done) < len(futures):
            stay = [futures[r] for r in (range(len(futures)) if leave is False else np.flatnonzero(~leave))]
            with self._cond:
                self.queues[i + 1].append(_Batch(stay, images, carry, time.monotonic()))

    def _answer(self, futures, results=None, exc: Optional[BaseException] = None) -> None:
        for k, f in enumerate(futures):
            if exc is not None:
                f.set_exception(exc)
            else:
                f.set_result(results[k])
        with self._cond:
            self._pending -= len(futures)
            self._cond.notify_all()
