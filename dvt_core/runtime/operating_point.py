"""Operating points: which thresholds a cascade runs with, and what a calibrated checkpoint stores.

An operating point is one threshold per exit. A checkpoint may store

- ``thresholds``: its default operating point (what ``model.adaptive(images)`` and ``dvt predict`` use
  when given none);
- ``budgets``: a table of operating points found on the held-out part of the training set, one per
  budget index of the official sweep, with their held-out (and, for a release, test) accuracy and
  average MACs; ``dvt predict --budget`` chooses among them;
- ``calibration``: how the default was chosen (target MACs, the held-out numbers, the exit shares);
- ``holdout_anytime_accuracy``: each exit's held-out accuracy, which prices the "every image leaves at
  exit k" corners that the official sweep does not contain.

Everything here is numpy; no framework is imported. The CLI, the trainers (``dvt_core.training.config``) and
``tools/release_fashion_mnist.py`` all use these functions, so a checkpoint's metadata has one writer.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from dvt_core.runtime import policy
from dvt_core.errors import InputError

DEFAULT_RULE = "cheapest budget whose held-out accuracy reaches the last exit's"
"""How a trainer picks the default operating point it stores (:func:`default_operating_point`)."""

STALE_KEYS = ("default_budget", "default_operating_point", "subset_adaptive")
"""Metadata describing an earlier default operating point; dropped when a new one is stored."""

_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_macs(text) -> float:
    """A MAC count as a user writes it: ``5000000``, ``5e6``, ``5M``, ``5.17M``, ``300K``, ``1.2G``.

    The suffixes are the ones the CLI prints (``K`` = 1e3, ``M`` = 1e6, ``G`` = 1e9, any case); an
    optional trailing ``MACs`` is ignored. InputError for anything else, or a value that is not a
    positive finite number.
    """
    if isinstance(text, (int, float, np.integer, np.floating)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip()
        m = re.fullmatch(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([kKmMgG]?)(?:\s*MACs?)?", s)
        if not m:
            raise InputError(f"{s!r} is not a number of MACs (examples: 5000000, 5e6, 5M, 300K, 1.2G)")
        value = float(m.group(1)) * _SUFFIXES[m.group(2).lower()]
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"a MAC budget must be a positive number, got {text!r}")
    return value


def format_macs(n: float) -> str:
    """``5.17M``: the form :func:`parse_macs` reads back (to 10 kMACs)."""
    return f"{n / 1e6:.2f}M"


def exit_costs(spec) -> list[int]:
    """MACs of an image that leaves at each exit (everything up to and including that exit)."""
    from dvt_core.model.macs import exit_macs

    return [int(m) for m in exit_macs(spec)]


PRINTED_MACS_TOLERANCE = 5_000
"""Half the last digit :func:`format_macs` prints (``1.05M`` stands for 1,045,000..1,055,000 MACs)."""


def effective_budget(budget: float, spec) -> float:
    """``budget`` raised to the cost of an exit it stands for as dvt prints it, rounded: ``1.05M`` typed
    from the printed cost of an exit costing 1,053,000 MACs means that exit's cost, not a hair under it."""
    for cost in exit_costs(spec):
        if abs(float(budget) - cost) <= PRINTED_MACS_TOLERANCE:
            return max(float(budget), float(cost))
    return float(budget)


def check_budget(budget: Optional[float], spec) -> None:
    """InputError when no operating point of ``spec`` can average ``budget`` MACs or fewer (a budget
    within the printed rounding of an exit's cost counts as that cost: :func:`effective_budget`)."""
    if budget is None:
        return
    costs = exit_costs(spec)
    if not np.isfinite(budget) or effective_budget(budget, spec) < costs[0]:
        raise InputError(f"budget {budget:g} MACs is below the cheapest exit: every image runs exit 1, which "
                         f"costs {costs[0]} MACs ({format_macs(costs[0])}); the cheapest achievable average is "
                         f"{costs[0]} MACs")


def corner_thresholds(num_exits: int, k: int) -> np.ndarray:
    """Thresholds that send every image out at exit ``k`` (0-based)."""
    t = np.full(num_exits, policy.NEVER, dtype=np.float32)
    t[k] = policy.ALWAYS
    t[-1] = policy.ALWAYS
    return t


def _corners(spec, anytime: Optional[Sequence[float]]) -> list[dict]:
    """"Every image leaves at exit k" for each k, priced with the held-out accuracy of exit k when it is
    known; otherwise exit 1 alone (accuracy unknown), so a budget below the table's cheapest still fits."""
    n, costs = spec.num_exits, exit_costs(spec)
    known = anytime is not None and len(anytime) == n
    out = []
    for k in range(n if known else 1):
        out.append({"thresholds": [float(t) for t in corner_thresholds(n, k)], "holdout_macs": float(costs[k]),
                    "holdout_accuracy": float(anytime[k]) if known else -1.0,
                    "policy": f"every image leaves at exit {k + 1}"})
    return out


def _cost(entry: dict) -> float:
    return float(entry.get("holdout_macs", entry.get("test_macs", entry.get("macs", np.inf))))


def _accuracy(entry: dict) -> float:
    return float(entry.get("holdout_accuracy", entry.get("test_accuracy", entry.get("accuracy", 0.0))))


def select(table: Sequence[dict], spec, budget: float, anytime: Optional[Sequence[float]] = None) -> dict:
    """The most accurate entry of ``table`` or of the exit corners whose held-out average cost is at
    most ``budget``; among equally accurate ones the cheapest, then the first.

    Entries are dicts with ``thresholds`` and held-out numbers (``holdout_accuracy``, ``holdout_macs``);
    entries carrying only test-split numbers fall back on those. ``anytime`` is each exit's held-out
    accuracy. Returns ``thresholds``, ``budget_index`` (None for a corner), ``policy`` (None for a table
    entry), ``expected_macs`` and ``expected_accuracy`` (None when unknown).
    """
    check_budget(budget, spec)
    budget = effective_budget(budget, spec)
    fits = [b for b in list(table) + _corners(spec, anytime) if _cost(b) <= budget]
    best = max(fits, key=lambda b: (_accuracy(b), -_cost(b)))  # max keeps the first of equals
    acc = _accuracy(best)
    return {"thresholds": [float(t) for t in best["thresholds"]], "budget_index": best.get("budget"),
            "policy": best.get("policy"), "expected_macs": _cost(best),
            "expected_accuracy": acc if acc >= 0 else None}


def budget_operating_point(meta: dict, budget: float, spec, source: str = "the checkpoint") -> dict:
    """The calibrated operating point of a checkpoint for a target average cost of ``budget`` MACs.

    Chosen by :func:`select` from the checkpoint's ``budgets`` table (thresholds found on the held-out
    training part; its test-split numbers are never used to choose) and the exit corners.
    """
    check_budget(budget, spec)
    table = [b for b in (meta.get("budgets") or []) if isinstance(b, dict) and "thresholds" in b]
    if not table:
        raise InputError(f"{source} holds no calibrated budgets; pass --thresholds, or store thresholds for "
                         f"a budget with `dvt calibrate --weights FILE --budget {budget:g}`")
    return select(table, spec, budget, meta.get("holdout_anytime_accuracy"))


def stored_thresholds(spec, meta: Optional[dict], source: str = "the checkpoint") -> np.ndarray:
    """The default operating point ``meta`` stores, for every exit; InputError when it stores none."""
    from dvt_core.runtime.early_exit import normalize_thresholds

    if spec.num_exits == 1:
        return np.float32([policy.ALWAYS])
    stored = (meta or {}).get("thresholds")
    if stored is None:
        raise InputError(f"{source} stores no default thresholds; pass thresholds (one per exit), or store "
                         "a default operating point with `dvt calibrate --budget MACS`")
    return normalize_thresholds(stored, spec.num_exits)


def model_thresholds(model, thresholds=None) -> np.ndarray:
    """``thresholds`` as given, else the default operating point of the checkpoint ``model`` was built
    from (``model.checkpoint_meta["thresholds"]``); InputError saying so when there is none.
    Both backends' ``adaptive`` call this, so they resolve a missing argument alike."""
    if thresholds is not None:
        return thresholds
    meta = getattr(model, "checkpoint_meta", None)
    source = "the checkpoint this model was built from" if meta else \
        "this model (built without weights, or from a checkpoint without metadata)"
    return stored_thresholds(model.spec, meta, source)


def choose_thresholds(spec, meta: dict, source: str, thresholds=None, budget: Optional[float] = None
                      ) -> tuple[np.ndarray, str]:
    """Thresholds given, those calibrated for ``budget``, or the checkpoint's default; and a phrase
    saying which."""
    from dvt_core.runtime.early_exit import normalize_thresholds

    if spec.num_exits == 1:
        return np.float32([policy.ALWAYS]), "single exit"
    if thresholds is not None:
        return normalize_thresholds(thresholds, spec.num_exits), "--thresholds"
    if budget is not None:
        op = budget_operating_point(meta, budget, spec, source)
        chosen = op["policy"] or f"calibrated budget #{op['budget_index']}"
        expect = (f"{op['expected_accuracy']:.2f}% at " if op["expected_accuracy"] is not None else "") + \
            f"{format_macs(op['expected_macs'])} MACs"
        what = f"budget {format_macs(budget)} MACs -> {chosen}; held-out: {expect}"
        return normalize_thresholds(op["thresholds"], spec.num_exits), what
    if meta.get("thresholds") is None:
        raise InputError(f"{source} stores no thresholds; pass --thresholds t1,t2,... or --budget MACS "
                         "(or store them with `dvt calibrate`)")
    return stored_thresholds(spec, meta, source), f"the default stored in {source}"


# ---- calibration: finding operating points on held-out images ------------------------------------------

def budgets_table(hold_probs, hold_labels, costs, test_probs=None, test_labels=None) -> list[dict]:
    """The official budget sweep with thresholds found on the held-out images, as metadata rows:
    ``budget``, ``thresholds``, ``holdout_accuracy``, ``holdout_macs`` and, with a test split,
    ``test_accuracy`` and ``test_macs``."""
    hold = policy.budget_sweep(hold_probs, hold_labels, hold_probs, hold_labels, costs)
    test = None if test_probs is None else policy.budget_sweep(hold_probs, hold_labels, test_probs, test_labels,
                                                               costs)
    rows = []
    for i in range(len(hold)):
        # the exit shares price the row under any other cost vector (a measured time per stage)
        shares = np.bincount(policy.assign_exits(hold_probs, hold.thresholds[i]), minlength=len(costs))
        row = {"budget": int(hold.budgets[i]), "thresholds": [float(v) for v in hold.thresholds[i]],
               "holdout_accuracy": float(hold.accuracy[i]), "holdout_macs": float(hold.cost[i]),
               "holdout_exit_shares": [float(s) for s in shares / shares.sum()]}
        if test is not None:
            row.update(test_accuracy=float(test.accuracy[i]), test_macs=float(test.cost[i]))
        rows.append(row)
    return rows


def calibrate(probs, labels, spec, budget: float) -> dict:
    """The operating point for ``budget`` MACs found on held-out ``probs`` (exits, N, classes) and
    ``labels``: the most accurate of the budget sweep and the exit corners whose average cost on these
    images fits. Returns ``thresholds``, ``calibration`` (the block a checkpoint stores), ``budgets``
    (the sweep as :func:`budgets_table` rows) and ``holdout_anytime_accuracy``."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise InputError("no calibration images")
    rows = budgets_table(probs, labels, exit_costs(spec))
    anytime = policy.anytime_accuracy(probs, labels).tolist()
    op = select(rows, spec, budget, anytime)
    thresholds = np.float32(op["thresholds"])
    shares = np.bincount(policy.assign_exits(probs, thresholds), minlength=spec.num_exits) / len(labels)
    block = {"target_macs": float(budget), "holdout_macs": float(op["expected_macs"]),
             "holdout_accuracy": float(op["expected_accuracy"]), "exit_shares": [float(s) for s in shares],
             "images": int(len(labels))}
    if op["policy"] is None:
        block["budget_index"] = int(op["budget_index"])
    else:
        block["policy"] = op["policy"]
    return {"thresholds": [float(t) for t in thresholds], "calibration": block, "budgets": rows,
            "holdout_anytime_accuracy": anytime}


def calibrated_meta(meta: Optional[dict], spec, thresholds, calibration: Optional[dict] = None,
                    budgets: Optional[list] = None, keep_budgets: bool = True,
                    holdout_anytime_accuracy: Optional[Sequence[float]] = None, **extra) -> dict:
    """``meta`` with a new default operating point: ``thresholds``, the ``calibration`` block, the
    ``budgets`` table with the exits' ``holdout_anytime_accuracy`` (an existing table is kept when
    ``keep_budgets``), the architecture it belongs to, and ``extra`` keys; metadata describing an
    earlier default is dropped."""
    out = dict(meta or {})
    out.setdefault("arch", spec.name)
    out.setdefault("spec", spec.to_dict())
    out.setdefault("exit_macs", exit_costs(spec))
    for stale in STALE_KEYS:
        out.pop(stale, None)
    out["thresholds"] = [float(t) for t in thresholds]
    out.pop("calibration", None)  # described the old thresholds
    if calibration is not None:
        out["calibration"] = dict(calibration)
    if budgets is not None and not (keep_budgets and out.get("budgets")):
        out["budgets"] = list(budgets)
        if holdout_anytime_accuracy is not None:
            out["holdout_anytime_accuracy"] = [float(a) for a in holdout_anytime_accuracy]
    out.update(extra)
    return out


def reaching(table: Sequence[dict], target_accuracy: float) -> dict:
    """The cheapest row of ``table`` whose held-out accuracy reaches ``target_accuracy`` (the most
    accurate row when none does): the default operating point of a release."""
    if not table:
        raise InputError("an empty budgets table has no operating point")
    ok = [b for b in table if b["holdout_accuracy"] >= target_accuracy]
    return min(ok, key=lambda b: b["holdout_macs"]) if ok else max(table, key=lambda b: b["holdout_accuracy"])


def default_operating_point(budgets: list, target: float, rule: str = DEFAULT_RULE) -> dict:
    """The row of ``budgets`` chosen by :func:`reaching` for ``target``, with the ``rule`` and the
    ``holdout_target_accuracy`` that chose it."""
    return dict(reaching(budgets, target), rule=rule, holdout_target_accuracy=float(target))


def calibration_meta(probs: np.ndarray, labels: np.ndarray, costs, data: Optional[dict] = None,
                     target: Optional[float] = None, rule: str = DEFAULT_RULE) -> dict:
    """Metadata to merge into a checkpoint calibrated on held-out ``probs`` (exits, images, classes), as a
    trainer stores it: ``holdout_anytime_accuracy``, ``budgets``, ``thresholds`` (the default operating
    point's), ``default_budget``, ``default_operating_point`` and ``calibration`` (what data it came
    from). ``target`` defaults to the last exit's held-out accuracy."""
    anytime = policy.anytime_accuracy(probs, labels)
    meta = {"holdout_anytime_accuracy": [float(a) for a in anytime]}
    if len(costs) < 2:
        return meta
    budgets = budgets_table(probs, labels, costs)
    op = default_operating_point(budgets, float(anytime[-1]) if target is None else target, rule)
    meta.update({"budgets": budgets, "thresholds": op["thresholds"], "default_budget": op["budget"],
                 "default_operating_point": {k: op[k] for k in ("rule", "holdout_target_accuracy",
                                                                 "holdout_accuracy", "holdout_macs")},
                 "calibration": {"images": int(len(labels)), "holdout_accuracy": op["holdout_accuracy"],
                                 "holdout_macs": op["holdout_macs"], "budget_index": op["budget"],
                                 **(data or {})}})
    return meta


# ---- a budget in seconds: the same choice under a measured cost profile ----------------------------------------

def _row_shares(row: dict, n_exits: int, source: str) -> np.ndarray:
    """A budgets row's held-out exit shares, checked (the row is untrusted metadata)."""
    shares = row.get("holdout_exit_shares")
    if not isinstance(shares, list) or len(shares) != n_exits:
        raise InputError(f"the budgets table of {source} does not store each operating point's exit shares, which "
                         "a time budget needs; recalibrate it with `dvt calibrate --latency-budget TIME`")
    values = np.asarray([float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan
                         for v in shares])
    if not np.isfinite(values).all() or (values < 0).any() or abs(values.sum() - 1.0) > 1e-6:
        raise InputError(f"{source}: a budgets row's holdout_exit_shares are not shares summing to 1")
    return values


def latency_operating_point(meta: dict, seconds: float, spec, seconds_of, source: str = "the checkpoint") -> dict:
    """The most accurate calibrated operating point of ``meta`` whose expected time per image is at most
    ``seconds``, as :func:`select` chooses for MACs: every row and exit corner priced by ``seconds_of(exit
    shares)`` (a measured cost profile's :func:`dvt_core.runtime.cost_model.expected_seconds` at one batch
    size) from its held-out exit shares. Returns what :func:`select` does plus ``expected_seconds`` and
    ``exit_shares``."""
    table = [b for b in (meta.get("budgets") or []) if isinstance(b, dict) and "thresholds" in b]
    if not table:
        raise InputError(f"{source} holds no calibrated budgets; calibrate it with `dvt calibrate "
                         f"--latency-budget {seconds * 1e3:g}ms`")
    entries = [(b, _row_shares(b, spec.num_exits, source)) for b in table]
    entries += [(c, np.eye(spec.num_exits)[k]) for k, c in enumerate(_corners(spec, meta.get("holdout_anytime_accuracy")))]
    priced = [(b, sh, seconds_of(sh)) for b, sh in entries]
    fits = [e for e in priced if e[2] <= seconds]
    if not fits:
        cheapest = seconds_of(np.eye(spec.num_exits)[0])
        raise InputError(f"no operating point of {source} fits {seconds * 1e3:.4g} ms per image on the measured "
                         f"profile: the cheapest, every image leaving at exit 1, takes {cheapest * 1e3:.4g} ms")
    best, shares, cost = max(fits, key=lambda e: (_accuracy(e[0]), -e[2]))  # max keeps the first of equals
    acc = _accuracy(best)
    return {"thresholds": [float(t) for t in best["thresholds"]], "budget_index": best.get("budget"),
            "policy": best.get("policy"), "expected_seconds": float(cost),
            "expected_macs": float(shares @ np.asarray(exit_costs(spec), np.float64)),
            "expected_accuracy": acc if acc >= 0 else None, "exit_shares": [float(s) for s in shares]}


def calibrate_latency(probs, labels, spec, seconds: float, seconds_of) -> dict:
    """:func:`calibrate` for a time budget: the operating point found on held-out ``probs`` and ``labels``
    whose expected time per image, ``seconds_of(exit shares)`` (a measured cost profile's), is at most
    ``seconds``, the most accurate such (:func:`latency_operating_point`). The same keys as :func:`calibrate`;
    the ``budgets`` rows carry their exit shares, so that a later time budget can be priced from them."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise InputError("no calibration images")
    rows = budgets_table(probs, labels, exit_costs(spec))
    anytime = policy.anytime_accuracy(probs, labels).tolist()
    op = latency_operating_point({"budgets": rows, "holdout_anytime_accuracy": anytime}, seconds, spec,
                                 seconds_of, "the calibration images")
    block = {"target_ms": float(seconds * 1e3), "holdout_ms": op["expected_seconds"] * 1e3,
             "holdout_macs": op["expected_macs"], "holdout_accuracy": float(op["expected_accuracy"]),
             "exit_shares": op["exit_shares"], "images": int(len(labels))}
    if op["policy"] is None:
        block["budget_index"] = int(op["budget_index"])
    else:
        block["policy"] = op["policy"]
    return {"thresholds": op["thresholds"], "calibration": block, "budgets": rows,
            "holdout_anytime_accuracy": anytime}
