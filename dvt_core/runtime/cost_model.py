"""A cost model measured on the user's machine: each stage's time inside the cascade (``dvt profile``).

MACs price a stage by its arithmetic; on a real CPU a small stage costs what its fixed costs (calls, weight
traffic, host hand-over) cost, so the operating point that fits a MAC budget is not the one that fits a time
budget. A *cost profile* records, for one runtime, precision and thread count, the milliseconds per image of
every stage run in turn on each measured batch size (each stage on the carry the previous one produced, as
early exit runs them; every image going on), and, when measured, the static model's. It is stored as
``cost_profile`` in a checkpoint's metadata or an export's manifest with the machine it was measured on, and
read back through :func:`dvt_core.checkpoint.metadata.check_cost_profile` (untrusted, bounded).

The expected time per image of an operating point at batch size ``b`` is
``overhead_ms(b) + sum_k reaching_k * stage_ms_k(b)``, ``reaching_k`` the share of the images that run stage
``k`` and ``overhead_ms`` the host's part of an adaptive call per image (an adaptive call that sends every image
through every stage, less its stages), with three refinements. A stage's fixed cost per call (``stage_call_ms``,
measured at ``b // 8``) is paid by every batch that any image carries to it, not in proportion to the images.
A stage whose weights the batch before left in cache costs less (``stage_hot_ms``: measured with every image
leaving at its exit): at batch 1 most images leave at exit 1, so the next image's stage 1 usually finds its
weights where the last one left them, which the all-through ``stage_ms`` never sees. And a call that runs
another number of images than the call before it at that stage may cost more (``stage_shape_ms``: OpenVINO's
dynamically shaped graphs), which early exit at ``b > 1`` does at nearly every call (:func:`expected_seconds`). The budget machinery
(:mod:`dvt_core.runtime.operating_point`) prices every calibrated operating point by its exit shares with it
and chooses for seconds as it does for MACs. Everything runs through the runtime contract; no framework is imported here.
"""
from __future__ import annotations

import math
import os
import platform
import re
import time
from typing import Callable, Optional, Sequence

import numpy as np

from dvt_core.errors import InputError
from dvt_core.checkpoint.metadata import COST_PROFILE_VERSION, check_cost_profile

_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def parse_latency(text) -> float:
    """A time budget per image as a user writes it (``0.4ms``, ``400us``, ``0.0004s``) in seconds; a bare
    number is milliseconds. InputError for anything else or a value that is not positive and finite."""
    m = re.fullmatch(r"\s*((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(s|ms|us|µs)?\s*", str(text))
    if not m:
        raise InputError(f"{text!r} is not a time per image (examples: 0.4ms, 400us, 0.0004s)")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "ms"]
    if not np.isfinite(seconds) or seconds <= 0:
        raise InputError(f"a latency budget must be a positive time, got {text!r}")
    return seconds


# ---- the machine --------------------------------------------------------------------------------------------

def cpu_info() -> tuple[str, bool]:
    """(the CPU's model name, whether it has AMX) from /proc/cpuinfo where there is one."""
    name, amx = platform.processor() or platform.machine(), False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    name = value.strip()
                elif key.strip() == "flags":
                    amx = "amx_tile" in value.split()
                    break
    except OSError:
        pass
    return name[:200], amx


def machine_record(runtime: str, precision: str, threads: Optional[int]) -> dict:
    """What the figures depend on: CPU model, AMX or not, cores, threads, the versions that ran them."""
    from importlib import metadata

    from dvt_core.runtime.contract import RUNTIMES

    cpu, amx = cpu_info()
    versions = {}
    for package in ("dvt", RUNTIMES[runtime][1]):
        try:
            versions[package] = metadata.version(package)[:64]
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return {"cpu": cpu, "amx": amx, "cores": os.cpu_count() or 1, "platform": platform.platform()[:200],
            "python": platform.python_version(), "versions": versions}


# ---- measuring ------------------------------------------------------------------------------------------------

def stage_seconds(model, xs: list) -> np.ndarray:
    """Seconds of each stage summed over the batches ``xs`` (the runtime's tensors), called inside the model's
    inference context: the stages run in turn on each batch, each on the carry the stage before produced,
    its logits brought to the host (as early exit reads them)."""
    from dvt_core.runtime.contract import backend_of

    b, n = backend_of(model), model.spec.num_exits
    per = np.zeros(n)
    for x in xs:
        carry = None
        for i in range(n):
            t = time.perf_counter()
            logits, carry = b.run_stage(model, i, x, carry)
            b.to_numpy(logits)
            per[i] += time.perf_counter() - t
    return per


def _time_cascade(model, xs: list, rounds: int) -> np.ndarray:
    """Best seconds of each stage over ``rounds`` rounds of :func:`stage_seconds`."""
    from dvt_core.runtime.contract import backend_of

    best = np.full(model.spec.num_exits, np.inf)
    with backend_of(model).inference(model):
        for _ in range(rounds):
            best = np.minimum(best, stage_seconds(model, xs))
    return best


def _time_static(static, xs: list, rounds: int) -> float:
    return float(_time_cascade(static, xs, rounds).sum())


class _TimedRuntime:
    """``runtime`` with the moment each stage starts (``marks``: (stage, time)) and each exit's logits reach the
    host (``fetched``) written down; everything else is the runtime's own."""

    def __init__(self, runtime):
        self._runtime, self.marks, self.fetched = runtime, [], []

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def run_stage(self, model, index: int, images, carry=None):
        self.marks.append((index, time.perf_counter()))
        return self._runtime.run_stage(model, index, images, carry)

    def to_numpy(self, tensor):
        out = self._runtime.to_numpy(tensor)
        self.fetched.append(time.perf_counter())
        return out


def _adaptive_stage_seconds(model, xs: list, deepest: Optional[int] = None) -> tuple[np.ndarray, float]:
    """One round of true early exit over the batches ``xs``, every image going on to exit ``deepest`` (the
    last by default) and leaving there, each stage timed where it runs: (seconds of each stage, from its call
    to the next stage's: its logits to the host and the confidences included; the deepest one's until its
    logits are on the host; seconds of the whole calls, inference context and results included).
    Through the runtime contract, as ``model.adaptive`` runs."""
    from dvt_core.runtime.contract import backend_of
    from dvt_core.runtime.early_exit import run_adaptive
    from dvt_core.runtime.policy import ALWAYS, NEVER

    b, n = backend_of(model), model.spec.num_exits
    deepest = n - 1 if deepest is None else deepest
    every = [float(NEVER)] * deepest + [float(ALWAYS)] * (n - deepest)
    secs, calls = np.zeros(n), 0.0
    for x in xs:
        timed = _TimedRuntime(b)
        marks, fetched = timed.marks, timed.fetched
        start = time.perf_counter()
        with b.inference(model):
            run_adaptive(timed, model, b.images_in(model, x), every)
        calls += time.perf_counter() - start
        # the deepest stage ends with its logits on the host: the results assembled after it are paid by every
        # image whatever its exit, so they count to the call's own time, not to that stage
        for k, (i, t) in enumerate(marks):
            secs[i] += (marks[k + 1][1] if k + 1 < len(marks) else fetched[-1]) - t
    return secs, calls


def _hot_seconds(model, xs: list) -> np.ndarray:
    """Seconds of each stage ``k`` before the last over the batches ``xs`` when the batch before was the
    deepest at ``k`` too (every image leaving at exit ``k``, so the weights stage ``k`` read last time may
    still be in cache); the last stage's entry is 0 (its hot time is the all-through one)."""
    hot = np.zeros(model.spec.num_exits)
    for k in range(model.spec.num_exits - 1):
        hot[k] = _adaptive_stage_seconds(model, xs, deepest=k)[0][k]
    return hot


def _shape_change_seconds(model, images: np.ndarray, size: int, rounds: int) -> np.ndarray:
    """Per stage, the seconds a call costs beyond its own when the call before it at that stage ran another
    number of images: early exit hands every stage after the first a different count at nearly every call, and
    a runtime with dynamically shaped graphs (OpenVINO) prepares its nodes anew at each change. Each stage runs
    on ``size`` and ``size + 1`` images alternating, less the same four calls at a steady count, the fastest of
    ``rounds``; 0 for the first stage (it always runs the whole batch) and where no cost shows."""
    from dvt_core.runtime.contract import backend_of

    b, n = backend_of(model), model.spec.num_exits
    inputs = []  # per count: the images and, per stage, the carry it reads
    with b.inference(model):
        for count in (size, size + 1):
            x, carry, carries = b.to_tensor(model, images[:count]), None, []
            for i in range(n):
                carries.append(carry)
                carry = b.run_stage(model, i, x, carry)[1]
            inputs.append((x, carries))

        def timed(i: int, order: list, settle: bool) -> float:
            if settle:  # one untimed call, so that the first timed one finds the same count before it
                b.to_numpy(b.run_stage(model, i, inputs[order[0]][0], inputs[order[0]][1][i])[0])
            start = time.perf_counter()
            for k in order:
                b.to_numpy(b.run_stage(model, i, inputs[k][0], inputs[k][1][i])[0])
            return time.perf_counter() - start

        extra = np.zeros(n)
        for i in range(1, n):
            steady = alternating = np.inf
            for _ in range(rounds):  # the steady block ends on size + 1, so the alternating one starts on a change
                steady = min(steady, timed(i, [0, 0], True) + timed(i, [1, 1], True))
                alternating = min(alternating, timed(i, [0, 1, 0, 1], False))
            extra[i] = max(alternating - steady, 0.0) / 4
    return extra


def _row(batch: int, count: int, full: tuple, thin: Optional[tuple], thin_batch: int,
         hot: Optional[np.ndarray] = None, shape: Optional[np.ndarray] = None) -> dict:
    """A profile row from the best round at ``batch`` (``full``) and at ``thin_batch`` (``thin``, a smaller
    batch of the same images): each stage's ms per image, its fixed ms per call (the intercept of its time
    per call against the rows it runs: what a stage costs a batch even when few of its images reach it), and
    the calls' own ms per image; with ``hot`` (:func:`_hot_seconds`), each stage's ms per image when the batch
    before was the deepest at it (the last stage's: its all-through time); with ``shape``
    (:func:`_shape_change_seconds`), each stage's extra ms per call after a call with another image count."""
    (secs, calls), calls_per_stage = full, count / batch
    per_call = secs / calls_per_stage
    fixed = np.zeros_like(per_call)
    if thin is not None and thin_batch < batch:
        thin_per_call = thin[0] / (count / thin_batch)
        slope = (per_call - thin_per_call) / (batch - thin_batch)
        fixed = np.clip(per_call - slope * batch, 0.0, per_call)
    row = {"batch": batch, "images": count, "stage_ms": [float(v) for v in secs / count * 1e3],
           "stage_call_ms": [float(v) for v in fixed * 1e3],
           "overhead_ms": max(calls - float(secs.sum()), 0.0) / count * 1e3, "total_ms": calls / count * 1e3}
    if hot is not None:
        row["stage_hot_ms"] = [float(v) for v in hot[:-1] / count * 1e3] + row["stage_ms"][-1:]
    if shape is not None:
        row["stage_shape_ms"] = [float(v) for v in shape * 1e3]
    return row


def measure(model, images: np.ndarray, batch_sizes: Sequence[int], repeats: int = 3, warmup: int = 1,
            static=None, threads: Optional[int] = None, precision: str = "fp32",
            step: Optional[Callable[[str], None]] = None) -> dict:
    """The cost profile of ``model`` on this machine. For each batch size ``b``, over ``images`` (as many
    whole batches as they fill; at least one), true early exit with every image through every stage, the
    fastest of ``repeats`` rounds after ``warmup``: each stage's ms per image (``stage_ms``), its fixed ms per
    call (``stage_call_ms``, from the same images at batch ``b // 8``), the calls' own ms per image
    (``overhead_ms``), each stage's ms per image with its weights left hot by a batch before that was the
    deepest at it (``stage_hot_ms``, the fastest of ``repeats`` rounds of every image leaving at its exit),
    at ``b > 1`` each stage's extra ms per call when the count of images it runs changes from the call before
    (``stage_shape_ms``, :func:`_shape_change_seconds` at ``b // 8`` images) and, with ``static``, the same
    runtime's static model's ms per image, its rounds interleaved with the cascade's so that load hits both
    alike. ``step`` is called once per batch size."""
    from dvt_core.runtime.contract import backend_of

    runtime = backend_of(model)
    rows = []
    for batch in sorted(set(int(b) for b in batch_sizes)):
        count = len(images) - len(images) % batch
        if count == 0:
            raise InputError(f"{len(images)} images do not fill one batch of {batch}")
        thin_batch = max(1, batch // 8)
        xs, thin = ([runtime.to_tensor(model, images[i:i + size]) for i in range(0, count, size)]
                    for size in (batch, thin_batch))
        xs_static = None if static is None else [backend_of(static).to_tensor(static, images[i:i + batch])
                                                 for i in range(0, count, batch)]
        for _ in range(warmup):  # the hot rounds run the same stages on the same shapes: warmed by these
            _adaptive_stage_seconds(model, xs)
        full, slim, hot, static_best = (np.inf, np.inf), None, np.inf, np.inf
        for _ in range(repeats):  # a round of each at a time, so that load hits them alike
            full = min(full, _adaptive_stage_seconds(model, xs), key=lambda r: r[1])
            hot = np.minimum(hot, _hot_seconds(model, xs))
            if batch > 1:
                slim = min(slim or (np.inf, np.inf), _adaptive_stage_seconds(model, thin), key=lambda r: r[1])
            if static is not None:
                static_best = min(static_best, _time_static(static, xs_static, 1))
        shape = None if batch == 1 else _shape_change_seconds(model, images, thin_batch, repeats)
        row = _row(batch, count, full, slim, thin_batch, hot, shape)
        if static is not None:
            row["static_ms"] = float(static_best / count * 1e3)
        rows.append(row)
        if step is not None:
            step(f"batch {batch}")
    profile = {"version": COST_PROFILE_VERSION, "runtime": runtime.name, "precision": precision,
               "threads": threads, "repeats": int(repeats), "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime()),
               "machine": machine_record(runtime.name, precision, threads), "batches": rows}
    return check_cost_profile(profile, "the measured cost profile", InputError, model.spec.num_exits)


# ---- reading a profile: the cost vector of a budget -------------------------------------------------------------

def stored_profile(meta: Optional[dict], runtime: str, precision: str, source: str) -> dict:
    """The cost profile ``meta`` stores, checked, measured for ``runtime`` at ``precision``; InputError saying
    how to measure one when there is none or it was measured for another runtime or precision."""
    from dvt_core.errors import CheckpointError

    profile = (meta or {}).get("cost_profile")
    if profile is None:
        raise InputError(f"{source} stores no cost profile; measure one on this machine with "
                         f"`dvt profile --weights ... --backend {runtime} --precision {precision}`")
    check_cost_profile(profile, f"{source}: cost_profile", CheckpointError, None)
    if (profile["runtime"], profile["precision"]) != (runtime, precision):
        raise InputError(f"the cost profile in {source} was measured for {profile['runtime']} "
                         f"{profile['precision']}, not {runtime} {precision}; measure again with "
                         f"`dvt profile --backend {runtime} --precision {precision}`")
    return profile


def batch_row(profile: dict, batch: int, source: str = "the cost profile") -> dict:
    """The profile's figures at ``batch``; InputError naming the batch sizes it has otherwise."""
    for row in profile["batches"]:
        if row["batch"] == int(batch):
            return row
    have = ", ".join(str(r["batch"]) for r in profile["batches"])
    raise InputError(f"{source} was measured at batch size(s) {have}, not {batch}; measure it with "
                     f"`dvt profile --batch-sizes {batch}` or choose a measured batch size")


def exit_seconds(row: dict) -> np.ndarray:
    """Seconds per image of an image that leaves at each exit when every image of the batch does (and of the
    batch before: the exit's own stage hot): the stages before it all-through, its own hot, plus the calls'
    own time (what "every image leaves at exit k" costs; :func:`expected_seconds` of that exit alone)."""
    cold = np.asarray(row["stage_ms"], np.float64)
    hot = np.asarray(row.get("stage_hot_ms") or cold, np.float64)
    before = np.concatenate([[0.0], np.cumsum(cold)[:-1]])
    return (before + hot + float(row.get("overhead_ms") or 0.0)) * 1e-3


def hot_chances(exit_shares: Sequence[float], batch: int) -> np.ndarray:
    """``q_k``: the chance that the batch before (of ``batch`` images, each leaving at exit ``k`` with chance
    ``exit_shares[k]``) went no deeper than stage ``k`` and reached it, ``F_k ** b - F_(k-1) ** b`` with
    ``F_k`` the share leaving at exit ``k`` or before (``F_0 = 0``): the exit share itself at batch 1."""
    left = np.clip(np.cumsum(np.asarray(exit_shares, np.float64)), 0.0, 1.0)
    deepest_at_most = left ** int(batch)
    return np.diff(deepest_at_most, prepend=0.0)


def expected_seconds(row: dict, exit_shares: Sequence[float]) -> float:
    """Expected seconds per image at the row's batch size ``b`` when ``exit_shares[k]`` of the images leave at
    exit ``k``; in ms:

        overhead + sum_k [ r_k * (t_k - c_k / b) + (1 - (1 - r_k) ** b) / b * c_k ],
        t_k = q_k * hot_k + (1 - q_k) * stage_k,

    ``r_k`` the share of the images reaching stage ``k``; ``stage_k`` its all-through ms per image (the batch
    before went through every stage, pushing stage ``k``'s weights out of cache), ``hot_k`` its ms per image
    when the batch before was the deepest at ``k`` (``stage_hot_ms``; without it hot is all-through),
    ``q_k`` the chance of that (:func:`hot_chances`: the exit share at batch 1, about 0 at batch 64 with most
    images leaving at exit 1); ``c_k`` its fixed ms per call (``stage_call_ms``, measured all-through), paid
    by every batch that carries any image to the stage, ``(1 - (1 - r_k) ** b) / b`` calls per image. The
    hot/cold mix is applied to the per-image part only: the fixed part was fitted from all-through calls, and
    one hot batch size cannot split a hot saving into per call and per row; at batch 1 the two are the same.
    A stage's calls also pay ``u_k * s_k``, its extra ms per call after a call with another image count
    (``stage_shape_ms``) times the chance of that (:func:`count_change_chances`; 0 at batch 1).
    With no fixed part, no hot times and no shape costs this is ``sum_k r_k * stage_k``."""
    shares = np.asarray(exit_shares, np.float64)
    reaching = np.clip(np.cumsum(shares[::-1])[::-1], 0.0, 1.0)
    b = int(row["batch"])
    cold = np.asarray(row["stage_ms"], np.float64)
    hot = np.asarray(row.get("stage_hot_ms") or cold, np.float64)
    q = hot_chances(shares, b)
    stage = q * hot + (1.0 - q) * cold
    fixed = np.asarray(row.get("stage_call_ms") or np.zeros_like(cold), np.float64)
    shape = np.asarray(row.get("stage_shape_ms") or np.zeros_like(cold), np.float64)
    calls = (1.0 - (1.0 - reaching) ** b) / b
    per_call = fixed + (count_change_chances(reaching, b) * shape if shape.any() else 0.0)
    return float((row.get("overhead_ms") or 0.0) + reaching @ (stage - fixed / b) + calls @ per_call) * 1e-3


def count_change_chances(reaching: Sequence[float], batch: int) -> np.ndarray:
    """Per stage, the chance that a call runs another number of images than the call before it at that stage,
    when each of ``batch`` images reaches it with chance ``reaching[k]`` (binomial counts, two calls apart
    independent, counts of 0 skipped): ``1 - sum_j p_j ** 2 / (1 - p_0) ** 2``. 0 at batch 1 and for a stage
    every image reaches; near 1 at batch 64 for a stage a third of the images reach."""
    b = int(batch)
    j = np.arange(b + 1, dtype=np.float64)
    log_choose = np.array([math.lgamma(b + 1) - math.lgamma(k + 1) - math.lgamma(b - k + 1) for k in range(b + 1)])
    out = []
    for r in np.asarray(reaching, np.float64):
        if r <= 0.0 or r >= 1.0:
            out.append(0.0)
            continue
        pmf = np.exp(log_choose + j * math.log(r) + (b - j) * math.log1p(-r))
        out.append(float(max(0.0, 1.0 - (pmf[1:] ** 2).sum() / (1.0 - pmf[0]) ** 2)))
    return np.asarray(out)


def payoff(profile: dict, exit_shares: Sequence[float]) -> list[dict]:
    """For every measured batch size: the expected adaptive ms per image at ``exit_shares``, every stage's
    (all images running all stages), the static model's when measured, and whether early exit pays (cheaper
    than both)."""
    out = []
    for row in profile["batches"]:
        adaptive = expected_seconds(row, exit_shares) * 1e3
        every = float(sum(row["stage_ms"]) + (row.get("overhead_ms") or 0.0))
        static = row.get("static_ms")
        best_other = min(every, static) if static is not None else every
        out.append({"batch": row["batch"], "adaptive_ms": adaptive, "all_stages_ms": every, "static_ms": static,
                    "pays": adaptive < best_other})
    return out


def payoff_lines(profile: dict, exit_shares: Sequence[float]) -> list[str]:
    """What a person reads: per measured batch size, does early exit pay on this machine; the last line says
    from which measured batch size on it does (or that it pays at none, or at every one)."""
    rows, lines = payoff(profile, exit_shares), []
    where = f"{profile['runtime']} {profile['precision']}"
    for r in rows:
        versus = f"all stages {r['all_stages_ms']:.3f}" + ("" if r["static_ms"] is None else
                                                            f", static {r['static_ms']:.3f}")
        verdict = "pays" if r["pays"] else "does not pay"
        lines.append(f"batch {r['batch']}: early exit {verdict} ({where}: adaptive {r['adaptive_ms']:.3f} ms/img "
                     f"expected; {versus} ms/img)")
    paying = [r["batch"] for r in rows if r["pays"]]
    start = None  # the smallest measured batch size from which on every larger measured one pays
    for r in reversed(rows):
        if not r["pays"]:
            break
        start = r["batch"]
    if not paying:
        lines.append(f"early exit does not pay at any measured batch size ({', '.join(str(r['batch']) for r in rows)}) "
                     f"on this machine in {where}")
    elif start is None:
        lines.append(f"early exit pays only at batch {', '.join(map(str, paying))} on this machine in {where}")
    elif start != rows[0]["batch"]:
        lines.append(f"early exit starts to pay at batch {start} on this machine in {where}")
    else:
        lines.append(f"early exit pays at every measured batch size on this machine in {where}")
    return lines


def profile_prediction(meta: Optional[dict], runtime: str, precision: str, batch: int, exit_shares,
                       realised_ms: float) -> Optional[dict]:
    """What a stored cost profile predicts for an adaptive run that took ``realised_ms`` per image with
    ``exit_shares`` at ``batch`` (``dvt benchmark``), beside what was realised; None when ``meta`` holds no
    profile for this runtime, precision and batch size (a benchmark times such models too)."""
    from dvt_core.errors import DVTError

    try:
        profile = stored_profile(meta, runtime, precision, "the weights")
        row = batch_row(profile, batch)
    except DVTError:
        return None
    predicted = expected_seconds(row, exit_shares) * 1e3
    out = {"predicted_ms": predicted, "realised_ms": float(realised_ms), "error": predicted / realised_ms - 1,
           "all_stages_ms": float(exit_seconds(row)[-1] * 1e3), "static_ms": row.get("static_ms"),
           "cpu": profile["machine"].get("cpu"), "threads": profile.get("threads")}
    if row.get("static_ms") is not None:
        out["predicted_speedup"] = row["static_ms"] / predicted
    return out
