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
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from dvt_core.errors import InputError, QueueFullError, SchedulerClosedError
from dvt_core.runtime.early_exit import exit_step, normalize_thresholds


@dataclass
class Prediction:
    """One image's outcome: class index, confidence at the exit taken, the stage that answered it
    (``stage_index``, counted from 0, for indexing) and its MACs. ``exit`` is the same exit counted from 1,
    as the CLI and HTTP answers say it."""

    class_index: int
    confidence: float
    stage_index: int
    macs: int
    logits: Optional[np.ndarray] = field(default=None, repr=False)  # float32 (classes,) at the exit taken
    exit_confidences: Optional[np.ndarray] = field(default=None, repr=False)  # float32 (exits,), NaN: not reached

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
    """Images waiting in one stage's queue: their answer slots, their tensor batch and carry (stage 1: one
    numpy image, no carry), when they entered the queue, their own thresholds (None: the service's; else
    float32 (B, exits), stage 1: (exits,)) and the confidences seen so far (float32 (B, exits); stage 1: None)."""

    slots: list
    images: Any
    carry: Any
    since: float
    thresholds: Optional[np.ndarray] = None
    seen: Optional[np.ndarray] = None


class _Group:
    """The answers of one request's images, in order; ``future`` completes once all are in (one wake-up of
    the caller per request, not per image), or with the first failure."""

    def __init__(self, n: int):
        self.future: Future = Future()
        self.future.set_running_or_notify_cancel()
        self.results: list = [None] * n
        self.left = n

    def slot(self, k: int) -> "_Slot":
        return _Slot(self, k)


class _Slot:
    """One image's place in a :class:`_Group` (answered on the worker thread only, like a Future)."""

    __slots__ = ("group", "k")

    def __init__(self, group: _Group, k: int):
        self.group, self.k = group, k

    def set_result(self, prediction) -> None:
        g = self.group
        g.results[self.k] = prediction
        g.left -= 1
        if g.left == 0 and not g.future.done():
            g.future.set_result(g.results)

    def set_exception(self, exc: BaseException) -> None:
        if not self.group.future.done():
            self.group.future.set_exception(exc)


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
        self.queues: list[deque] = [deque() for _ in range(self.num_exits)]
        self.waiting = [0] * self.num_exits  # images in each queue (kept, not counted: a request may queue hundreds)
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
        self._enqueue([future], image[None], None)
        return future

    def submit_many(self, images: np.ndarray, thresholds: Optional[np.ndarray] = None) -> Future:
        """Queue N normalised float32 images (N, C, H, W) as N entries of stage 1's queue (each image goes
        on or leaves on its own); a Future of their N :class:`Prediction` in order. ``thresholds`` (from
        :func:`normalize_thresholds`) apply to these images only. All N fit or none is queued."""
        group = _Group(len(images))
        if len(images) == 0:
            group.future.set_result([])
            return group.future
        self._enqueue([group.slot(k) for k in range(len(images))], images, thresholds)
        return group.future

    def _enqueue(self, slots: list, images: np.ndarray, thresholds: Optional[np.ndarray]) -> None:
        with self._cond:
            if self._closing or self._failure is not None:
                raise SchedulerClosedError("the service is shutting down")
            if self._pending + len(slots) > self.queue_limit:
                raise QueueFullError(f"the queue is full ({self.queue_limit} images at most, {self._pending} "
                                     f"waiting, {len(slots)} sent)")
            self._pending += len(slots)
            now = time.monotonic()
            self.queues[0].extend(_Batch([slot], image, None, now, thresholds) for slot, image in zip(slots, images))
            self.waiting[0] += len(slots)
            self._cond.notify()

    def depths(self) -> list[int]:
        """Images waiting in each stage's queue now."""
        with self._cond:
            return list(self.waiting)

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
            waiting = self.waiting[i]
            deadline = q[0].since + self.max_wait
            earlier_empty = i > 0 and not any(self.queues[:i])
            if waiting >= self.max_batch or now >= deadline or earlier_empty or self._closing:
                return i, None
            wake = deadline if wake is None else min(wake, deadline)
        return None, wake

    def _take(self, i: int) -> list[_Batch]:
        """Up to ``max_batch`` images from the head of stage ``i``'s queue (a waiting batch is split
        when only part of it fits; stage 1's entries hold one image each)."""
        q, taken, room = self.queues[i], [], self.max_batch
        while q and room:
            head = q[0]
            if len(head.slots) <= room:
                taken.append(q.popleft())
                room -= len(head.slots)
            else:
                taken.append(self._rows(head, slice(0, room)))
                q[0] = self._rows(head, slice(room, None))
                room = 0
        self.waiting[i] -= self.max_batch - room
        return taken

    def _rows(self, batch: _Batch, rows: slice) -> _Batch:
        idx = np.arange(len(batch.slots))[rows]
        images, carry = self.backend.select(batch.images, batch.carry, idx)
        own = None if batch.thresholds is None else batch.thresholds[rows]
        return _Batch(batch.slots[rows], images, carry, batch.since, own, batch.seen[rows])

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
                    for f in b.slots:
                        f.set_exception(exc)
                q.clear()
            self.waiting = [0] * self.num_exits
            self._pending = 0

    def _inputs(self, i: int, parts: Sequence[_Batch]) -> tuple[Any, Any, Any, np.ndarray]:
        """(images, carry, thresholds, confidences seen) of the parts as one batch: thresholds the service's
        (exits,) when no image brought its own, else (exits, B), which exit_step compares row by row."""
        b, model = self.backend, self.model
        if i == 0:
            images, carry = b.to_tensor(model, np.stack([p.images for p in parts])), None
            seen = np.full((len(parts), self.num_exits), np.nan, np.float32)
        elif len(parts) == 1:
            images, carry, seen = parts[0].images, parts[0].carry, parts[0].seen
        else:
            images, carry = b.join([(p.images, p.carry) for p in parts])
            seen = np.concatenate([p.seen for p in parts])
        if all(p.thresholds is None for p in parts):
            return images, carry, self.thresholds, seen
        rows = [np.broadcast_to(self.thresholds if p.thresholds is None else p.thresholds,
                                (len(p.slots), self.num_exits)) for p in parts]
        return images, carry, np.concatenate(rows).T, seen

    def _run(self, i: int, parts: Sequence[_Batch]) -> None:
        slots = [f for p in parts for f in p.slots]
        try:
            images, carry, t, seen = self._inputs(i, parts)
            lg, conf, leave, images, carry = exit_step(self.backend, self.model, i, images, carry, t, self.confidence)
        except Exception as exc:  # this batch fails alone; the service goes on
            self._answer(slots, exc=exc)
            return
        self.stage_runs[i] += 1
        seen[:, i] = conf
        done = np.arange(len(slots)) if leave is True else np.flatnonzero(leave)
        if self.observer is not None:  # counted before anyone is answered: a client then reads it in metrics
            self.observer(i, len(slots), np.full(len(done), i, np.int64))
        if self.controller is not None and len(done):
            adapted = self.controller.observe(self.exit_macs[i], len(done))
            if adapted is not None:
                self.thresholds = adapted  # the worker alone reads them: the next stage run uses them
        pred, macs = lg.argmax(axis=1).tolist(), self.exit_macs[i]
        self._answer([slots[r] for r in done],
                     [Prediction(pred[r], float(conf[r]), i, macs, lg[r], seen[r]) for r in done])
        if len(done) < len(slots):
            stay = np.arange(len(slots)) if leave is False else np.flatnonzero(~leave)
            own = None if t.ndim == 1 else np.ascontiguousarray(t.T[stay])
            with self._cond:
                self.queues[i + 1].append(_Batch([slots[r] for r in stay], images, carry, time.monotonic(), own,
                                                 seen[stay]))
                self.waiting[i + 1] += len(stay)

    def _answer(self, slots, results=None, exc: Optional[BaseException] = None) -> None:
        for k, f in enumerate(slots):
            if exc is not None:
                f.set_exception(exc)
            else:
                f.set_result(results[k])
        with self._cond:
            self._pending -= len(slots)
            self._cond.notify_all()
