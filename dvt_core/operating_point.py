"""The calibration metadata a checkpoint carries: budgets found on held-out images and its default
operating point (the thresholds ``predict`` uses when given none)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import policy

DEFAULT_RULE = "cheapest budget whose held-out accuracy reaches the last exit's"


def budgets_table(probs: np.ndarray, labels: np.ndarray, costs) -> list[dict]:
    """The official budget sweep with thresholds found on, and measured on, ``probs``/``labels``."""
    sweep = policy.budget_sweep(probs, labels, probs, labels, costs)
    return [{"budget": int(b), "thresholds": [float(v) for v in t], "holdout_accuracy": float(a),
             "holdout_macs": float(c)}
            for b, t, a, c in zip(sweep.budgets, sweep.thresholds, sweep.accuracy, sweep.cost)]


def default_operating_point(budgets: list[dict], target: float, rule: str = DEFAULT_RULE) -> dict:
    """The cheapest budget whose held-out accuracy reaches ``target``; the most accurate when none does."""
    ok = [b for b in budgets if b["holdout_accuracy"] >= target]
    best = min(ok, key=lambda b: b["holdout_macs"]) if ok else max(budgets, key=lambda b: b["holdout_accuracy"])
    return dict(best, rule=rule, holdout_target_accuracy=float(target))


def calibration_meta(probs: np.ndarray, labels: np.ndarray, costs, data: Optional[dict] = None,
                     target: Optional[float] = None, rule: str = DEFAULT_RULE) -> dict:
    """Metadata to merge into a checkpoint calibrated on held-out ``probs`` (exits, images, classes):
    ``holdout_anytime_accuracy``, ``budgets``, ``thresholds`` (the default operating point's),
    ``default_budget``, ``default_operating_point`` and ``calibration`` (what data it came from).
    ``target`` defaults to the last exit's held-out accuracy."""
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
