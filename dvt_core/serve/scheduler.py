"""The per-stage batching scheduler behind ``dvt serve``: one queue per stage, one worker thread.

Requests (N normalised images each, one queue entry per request) wait in stage 1's queue; the worker runs stage 1 on them once
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
    """Images waiting in one stage's queue, in rows: the requests they belong to (``groups``; row r is image
    ``position[r]`` of ``groups[member[r]]``), their tensor batch and carry (stage 1: the request's numpy
    images, no carry), when they entered the queue, their own thresholds (None: the service's; else float32
    (B, exits), stage 1: (exits,) for the whole request) and the confidences seen so far (float32 (B, exits);
    stage 1: None). A request enters as one entry: one lock and one wake-up, no object per image."""

    groups: list
    member: np.ndarray
    position: np.ndarray
    images: Any
    carry: Any
    since: float
    thresholds: Optional[np.ndarray] = None
    seen: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.member)


class Answers:
    """The answers of one request's N images as columns (what the ``/v2`` answer sends as they are):
    ``class_index``, ``confidence``, ``stage_index`` (counted from 0), ``macs`` (N,), ``logits`` (N, classes)
    at the exit taken and ``exit_confidences`` (N, exits; NaN where an image never ran). Indexing gives
    one image's :class:`Prediction`."""

    def __init__(self, n: int, num_exits: int):
        self.class_index = np.zeros(n, np.int64)
        self.stage_index = np.zeros(n, np.int64)
        self.macs = np.zeros(n, np.int64)
        self.confidence = np.zeros(n, np.float32)
        self.exit_confidences = np.full((n, num_exits), np.nan, np.float32)
        self.logits: Optional[np.ndarray] = None  # (N, classes) once the first image is answered

    @property
    def exit(self) -> np.ndarray:
        return self.stage_index + 1

    def __len__(self) -> int:
        return len(self.class_index)

    def __getitem__(self, k: int) -> Prediction:
        return Prediction(int(self.class_index[k]), float(self.confidence[k]), int(self.stage_index[k]),
                          int(self.macs[k]), None if self.logits is None else self.logits[k],
                          self.exit_confidences[k])

    def __iter__(self):
        return (self[k] for k in range(len(self)))


class _Group:
    """The answers of one request's images; ``future`` completes once all are in (one wake-up of the caller
    per request, not per image) with the :class:`Answers` (``single``: the one image's :class:`Prediction`),
    or with the first failure. Answered on the worker thread only."""

    def __init__(self, n: int, num_exits: int, single: bool = False):
        self.future: Future = Future()
        self.future.set_running_or_notify_cancel()  # a caller that gives up cannot cancel it under the worker
        self.answers = Answers(n, num_exits)
        self.left, self.single = n, single

    def fill(self, rows: np.ndarray, stage: int, macs: int, pred: np.ndarray, conf: np.ndarray, logits: np.ndarray,
             seen: np.ndarray) -> None:
        """Answer the request's images ``rows``: they left at ``stage``."""
        a = self.answers
        if a.logits is None:
            a.logits = np.zeros((len(a), logits.shape[1]), np.float32)
        a.class_index[rows], a.confidence[rows], a.stage_index[rows], a.macs[rows] = pred, conf, stage, macs
        a.logits[rows], a.exit_confidences[rows] = logits, seen
        self.left -= len(rows)
        if self.left == 0 and not self.future.done():
            self.future.set_result(a[0] if self.single else a)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def _owners(parts: Sequence[_Batch]) -> tuple[list, np.ndarray, np.ndarray]:
    """(groups, member, position) of the parts' rows as one batch (member renumbered into the joined groups)."""
    if len(parts) == 1:
        return parts[0].groups, parts[0].member, parts[0].position
    groups, members, offset = [], [], 0
    for p in parts:
        groups += p.groups
        members.append(p.member + offset)
        offset += len(p.groups)
    return groups, np.concatenate(members), np.concatenate([p.position for p in parts])


class StageScheduler:
    """Batches images through a model's stages; :meth:`submit` returns a Future of one image's :class:`Prediction`,
    :meth:`submit_many` of a request's :class:`Answers`.

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
        # CPU seconds of the worker thread inside the model's stages (all of the model's with one torch thread)
        self.model_cpu_s = 0.0
        self._pending = 0  # images submitted and not answered yet, all stages together
        self._cond = threading.Condition()
        self._closing = False
        self._failure: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._work, name="dvt-serve-worker", daemon=True)
        self._thread.start()

    # ---- the caller's side -----------------------------------------------------------------------
    def submit(self, image: np.ndarray) -> Future:
        """Queue one normalised float32 image (C, H, W); a Future of its :class:`Prediction`. QueueFullError
        at once when ``queue_limit`` images are in the service, SchedulerClosedError once :meth:`close` began."""
        return self._enqueue(image[None], None, single=True)

    def submit_many(self, images: np.ndarray, thresholds: Optional[np.ndarray] = None) -> Future:
        """Queue N normalised float32 images (N, C, H, W) as one entry of stage 1's queue whose images each go
        on or leave on their own (an entry is split where a batch fills); a Future of their :class:`Answers`.
        ``thresholds`` (from :func:`normalize_thresholds`) apply to these images only. All N fit or none is queued."""
        return self._enqueue(images, thresholds)

    def _enqueue(self, images: np.ndarray, thresholds: Optional[np.ndarray], single: bool = False) -> Future:
        n = len(images)
        group = _Group(n, self.num_exits, single)
        if n == 0:
            group.future.set_result(group.answers)
            return group.future
        entry = _Batch([group], np.zeros(n, np.intp), np.arange(n), images, None, 0.0, thresholds)
        with self._cond:
            if self._closing or self._failure is not None:
                raise SchedulerClosedError("the service is shutting down")
            if self._pending + n > self.queue_limit:
                raise QueueFullError(f"the queue is full ({self.queue_limit} images at most, {self._pending} "
                                     f"waiting, {n} sent)")
            self._pending += n
            entry.since = time.monotonic()
            self.queues[0].append(entry)
            self.waiting[0] += n
            self._cond.notify()
        return group.future

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
        """Up to ``max_batch`` images from the head of stage ``i``'s queue (a waiting entry is split when
        only part of it fits)."""
        q, taken, room = self.queues[i], [], self.max_batch
        while q and room:
            head = q[0]
            if len(head) <= room:
                taken.append(q.popleft())
                room -= len(head)
            else:
                taken.append(self._rows(head, slice(0, room)))
                q[0] = self._rows(head, slice(room, None))
                room = 0
        self.waiting[i] -= self.max_batch - room
        return taken

    def _rows(self, batch: _Batch, rows: slice) -> _Batch:
        if batch.seen is None:  # stage 1: numpy images of one request, its thresholds for all of them
            images, carry, own, seen = batch.images[rows], None, batch.thresholds, None
        else:
            images, carry = self.backend.select(batch.images, batch.carry, np.arange(len(batch))[rows])
            own = None if batch.thresholds is None else batch.thresholds[rows]
            seen = batch.seen[rows]
        return _Batch(batch.groups, batch.member[rows], batch.position[rows], images, carry, batch.since, own, seen)

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
                    for g in b.groups:
                        g.fail(exc)
                q.clear()
            self.waiting = [0] * self.num_exits
            self._pending = 0

    def _inputs(self, i: int, parts: Sequence[_Batch]) -> tuple[Any, Any, Any, np.ndarray]:
        """(images, carry, thresholds, confidences seen) of the parts as one batch: thresholds the service's
        (exits,) when no image brought its own, else (exits, B), which exit_step compares row by row."""
        b, model = self.backend, self.model
        if i == 0:
            images = parts[0].images if len(parts) == 1 else np.concatenate([p.images for p in parts])
            images, carry = b.to_tensor(model, images), None
            seen = np.full((sum(len(p) for p in parts), self.num_exits), np.nan, np.float32)
        elif len(parts) == 1:
            images, carry, seen = parts[0].images, parts[0].carry, parts[0].seen
        else:
            images, carry = b.join([(p.images, p.carry) for p in parts])
            seen = np.concatenate([p.seen for p in parts])
        if all(p.thresholds is None for p in parts):
            return images, carry, self.thresholds, seen
        rows = [np.broadcast_to(self.thresholds if p.thresholds is None else p.thresholds,
                                (len(p), self.num_exits)) for p in parts]
        return images, carry, np.concatenate(rows).T, seen

    def _run(self, i: int, parts: Sequence[_Batch]) -> None:
        groups, member, position = _owners(parts)
        try:
            images, carry, t, seen = self._inputs(i, parts)
            start = time.thread_time()
            lg, conf, leave, images, carry = exit_step(self.backend, self.model, i, images, carry, t, self.confidence)
            self.model_cpu_s += time.thread_time() - start
        except Exception as exc:  # this batch fails alone; the service goes on
            for g in groups:
                g.fail(exc)
            self._answered(len(member))
            return
        self.stage_runs[i] += 1
        seen[:, i] = conf
        done = np.arange(len(member)) if leave is True else np.flatnonzero(leave)
        if self.observer is not None:  # counted before anyone is answered: a client then reads it in metrics
            self.observer(i, len(member), np.full(len(done), i, np.int64))
        if self.controller is not None and len(done):
            adapted = self.controller.observe(self.exit_macs[i], len(done))
            if adapted is not None:
                self.thresholds = adapted  # the worker alone reads them: the next stage run uses them
        pred = lg.argmax(axis=1)
        # each request's leaving images answered at once: one fill per request in the batch, not one per image
        for g in (np.unique(member[done]) if len(groups) > 1 else [0] if len(done) else []):
            rows = done if len(groups) == 1 else done[member[done] == g]
            groups[g].fill(position[rows], i, self.exit_macs[i], pred[rows], conf[rows], lg[rows], seen[rows])
        if len(done) < len(member):
            stay = np.arange(len(member)) if leave is False else np.flatnonzero(~leave)
            own = None if t.ndim == 1 else np.ascontiguousarray(t.T[stay])
            with self._cond:
                self.queues[i + 1].append(_Batch(groups, member[stay], position[stay], images, carry,
                                                 time.monotonic(), own, seen[stay]))
                self.waiting[i + 1] += len(stay)
        self._answered(len(done))

    def _answered(self, count: int) -> None:
        with self._cond:
            self._pending -= count
            self._cond.notify_all()
