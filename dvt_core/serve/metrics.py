"""The service's counters, in the Prometheus text exposition format (version 0.0.4), hand-written.

Requests by status, a request-latency histogram, batch sizes per stage, exits taken, MACs per image
and the queue depths. Thread-safe: the worker thread counts stage runs, the event loop counts requests.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence

import numpy as np

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(float(b) for b in buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for k, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[k] += 1

    def state(self) -> list:
        return [list(self.counts), self.total, self.sum]

    def add(self, state: list) -> None:
        counts, total, total_sum = state
        self.counts = [a + b for a, b in zip(self.counts, counts)]
        self.total += total
        self.sum += total_sum

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_num(edge)}"}} {n}' for edge, n in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        tail = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{tail} {_num(self.sum)}", f"{name}_count{tail} {self.total}"]


def _num(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else str(int(x)) if abs(x) < 1e15 else repr(float(x))


class ServiceMetrics:
    """What ``GET /metrics`` reports. ``depths`` returns the images waiting per stage, read at exposition."""

    def __init__(self, num_exits: int, max_batch: int, exit_macs: Sequence[int],
                 depths: Optional[Callable[[], list]] = None, mac_budget: Optional[float] = None,
                 thresholds: Optional[Callable[[], Sequence[float]]] = None):
        self.num_exits = num_exits
        self.thresholds = thresholds  # the thresholds in force, read at exposition (they move with --adapt-budget)
        self.exit_macs = [int(m) for m in exit_macs]
        self.depths = depths
        self.model_cpu: Optional[Callable[[], float]] = None  # the scheduler's CPU seconds in the model so far
        self.mac_budget = mac_budget
        self._lock = threading.Lock()
        self.requests: dict[int, int] = {}
        self.latency = _Histogram(LATENCY_BUCKETS)
        edges = sorted(e for e in {1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch} if e <= max_batch)
        self.batch_sizes = [_Histogram(edges) for _ in range(num_exits)]
        self.exits = [0] * num_exits

    def request_done(self, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            self.latency.observe(seconds)

    def stage_ran(self, stage: int, batch_size: int, exits: np.ndarray) -> None:
        """The scheduler's observer: one stage run on ``batch_size`` images, ``exits`` of them leaving."""
        with self._lock:
            self.batch_sizes[stage].observe(batch_size)
            self.exits[stage] += len(exits)

    def mean_macs(self) -> float:
        with self._lock:
            n = sum(self.exits)
            return sum(c * m for c, m in zip(self.exits, self.exit_macs)) / n if n else 0.0

    def state(self) -> dict:
        """Every counter as plain data (what :meth:`render_merged` sums over the replicas of a deployment)."""
        depths = list(self.depths()) if self.depths is not None else [0] * self.num_exits
        with self._lock:
            return {"requests": {str(k): v for k, v in self.requests.items()}, "latency": self.latency.state(),
                    "batch_sizes": [h.state() for h in self.batch_sizes], "exits": list(self.exits), "depths": depths,
                    "model_cpu_s": self.model_cpu() if self.model_cpu is not None else 0.0}

    def render_merged(self, states: Sequence[dict]) -> str:
        """The exposition of the sum of several services' :meth:`state` (the replicas of one deployment, each
        state the latest its replica reported: every counter only grows); thresholds are this service's."""
        total = ServiceMetrics(self.num_exits, 1, self.exit_macs, mac_budget=self.mac_budget,
                               thresholds=self.thresholds)
        total.batch_sizes = [_Histogram(h.buckets) for h in self.batch_sizes]
        depths, model_cpu = [0] * self.num_exits, 0.0
        for st in states:
            model_cpu += st.get("model_cpu_s", 0.0)
            for code, n in st["requests"].items():
                total.requests[int(code)] = total.requests.get(int(code), 0) + n
            total.latency.add(st["latency"])
            for h, hs in zip(total.batch_sizes, st["batch_sizes"]):
                h.add(hs)
            total.exits = [a + b for a, b in zip(total.exits, st["exits"])]
            depths = [a + b for a, b in zip(depths, st["depths"])]
        total.depths, total.model_cpu = (lambda: depths), (lambda: model_cpu)
        return total.render()

    def render(self) -> str:
        depths = self.depths() if self.depths is not None else [0] * self.num_exits
        with self._lock:
            lines = ["# HELP dvt_requests_total HTTP requests answered, by status code.",
                     "# TYPE dvt_requests_total counter"]
            lines += [f'dvt_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines += ["# HELP dvt_request_latency_seconds Time from a request's arrival to its answer.",
                      "# TYPE dvt_request_latency_seconds histogram"]
            lines += self.latency.lines("dvt_request_latency_seconds")
            lines += ["# HELP dvt_stage_batch_size Images in each run of a stage.",
                      "# TYPE dvt_stage_batch_size histogram"]
            for i, h in enumerate(self.batch_sizes):
                lines += h.lines("dvt_stage_batch_size", f'stage="{i + 1}"')
            lines += ["# HELP dvt_exits_total Images that left at each exit (1-based).", "# TYPE dvt_exits_total counter"]
            lines += [f'dvt_exits_total{{exit="{i + 1}"}} {n}' for i, n in enumerate(self.exits)]
            images = sum(self.exits)
            macs = sum(c * m for c, m in zip(self.exits, self.exit_macs))
            lines += ["# HELP dvt_images_total Images answered.", "# TYPE dvt_images_total counter",
                      f"dvt_images_total {images}",
                      "# HELP dvt_macs_total Multiply-accumulates spent on the images answered.",
                      "# TYPE dvt_macs_total counter", f"dvt_macs_total {macs}",
                      "# HELP dvt_macs_per_image Average multiply-accumulates per image answered.",
                      "# TYPE dvt_macs_per_image gauge", f"dvt_macs_per_image {_num(macs / images if images else 0.0)}"]
            if self.mac_budget is not None:
                lines += ["# HELP dvt_macs_budget The average MACs per image the operating point was chosen for.",
                          "# TYPE dvt_macs_budget gauge", f"dvt_macs_budget {_num(self.mac_budget)}"]
        if self.thresholds is not None:
            lines += ["# HELP dvt_threshold The confidence an image needs to leave at each exit (1-based) now.",
                      "# TYPE dvt_threshold gauge"]
            lines += [f'dvt_threshold{{exit="{i + 1}"}} {_num(float(t))}'
                      for i, t in enumerate(list(self.thresholds())[:-1])]
        if self.model_cpu is not None:  # beside the process's own CPU counter: what the service spends outside the model
            lines += ["# HELP dvt_model_cpu_seconds_total CPU seconds the scheduler's worker spent in the model's stages.",
                      "# TYPE dvt_model_cpu_seconds_total counter", f"dvt_model_cpu_seconds_total {_num(self.model_cpu())}"]
        lines += ["# HELP dvt_queue_depth Images waiting in each stage's queue.", "# TYPE dvt_queue_depth gauge"]
        lines += [f'dvt_queue_depth{{stage="{i + 1}"}} {d}' for i, d in enumerate(depths)]
        return "\n".join(lines) + "\n"
