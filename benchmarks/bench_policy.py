"""Time ``dvt_core.runtime.policy.budget_sweep`` against an official-style per-sample loop.

The baseline re-implements the loop structure of the official ``inference.py`` (vectorised max and
sort, then a Python walk over the samples for the threshold search, and a Python loop over samples
and exits for the evaluation) on numpy arrays, for every budget 1..59. Both must give identical
thresholds, accuracies and expected costs; the script then prints the speed-up of one run.

    python3 benchmarks/bench_policy.py [--samples 5000] [--classes 100] [--exits 3] [--repeat 3]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dvt_core.runtime import policy  # noqa: E402


def _max_and_argmax(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the classes, like ``tensor.max(dim=2)`` returning values and indices."""
    argmax = probs.argmax(axis=2)
    return np.take_along_axis(probs, argmax[..., None], axis=2)[..., 0], argmax


def loop_find_thresholds(probs: np.ndarray, fractions: np.ndarray, lists: bool = False) -> np.ndarray:
    """The official search, one sample at a time: walk each exit's samples by falling confidence.

    Indexes numpy arrays element by element, as the official code indexes tensors; ``lists=True``
    walks Python lists instead (a faster pure-Python baseline, shown for reference).
    """
    n_exits, n_samples, _ = probs.shape
    max_preds, _ = _max_and_argmax(probs)
    sorted_idx = np.argsort(-max_preds, axis=1)
    walk_conf, walk_idx = (max_preds.tolist(), sorted_idx.tolist()) if lists else (max_preds, sorted_idx)
    taken = np.zeros(n_samples)
    thresholds = np.full(n_exits, 1e8, dtype=np.float32)
    for k in range(n_exits - 1):
        wanted = math.floor(n_samples * fractions[k])
        count = 0
        for i in range(n_samples):
            idx = walk_idx[k][i]
            if taken[idx] == 0:
                count += 1
                if count == wanted:
                    thresholds[k] = walk_conf[k][idx]
                    break
        taken += max_preds[k] >= thresholds[k]
    thresholds[-1] = -1e8
    return thresholds


def loop_evaluate(probs, targets, thresholds, costs, lists: bool = False) -> tuple[float, float]:
    """The official evaluation, one sample at a time."""
    n_exits, n_samples, _ = probs.shape
    max_preds, argmax_preds = _max_and_argmax(probs)
    if lists:
        max_preds, argmax_preds, targets, thresholds = (
            max_preds.tolist(), argmax_preds.tolist(), targets.tolist(), thresholds.tolist())
    correct, exits_at = 0, [0] * n_exits
    for i in range(n_samples):
        for k in range(n_exits):
            if max_preds[k][i] >= thresholds[k]:
                correct += int(targets[i] == argmax_preds[k][i])
                exits_at[k] += 1
                break
    return correct * 100.0 / n_samples, sum(exits_at[k] / n_samples * float(costs[k]) for k in range(n_exits))


def loop_sweep(train_probs, test_probs, test_targets, costs, budgets, lists: bool = False):
    rows = []
    for p in budgets:
        t = loop_find_thresholds(train_probs, policy.budget_fractions(p, train_probs.shape[0]), lists)
        rows.append((t, *loop_evaluate(test_probs, test_targets, t, costs, lists)))
    return rows


def synthetic(rng, n_exits, n_samples, n_classes):
    """Probabilities whose exits grow more confident and more accurate, like a real cascade."""
    targets = rng.integers(0, n_classes, size=n_samples)
    logits = rng.standard_normal((n_exits, n_samples, n_classes)).astype(np.float32)
    for k in range(n_exits):
        logits[k, np.arange(n_samples), targets] += 1.5 + 1.0 * k
    return policy.softmax(logits * 2), targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--exits", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="budget_sweep runs; the fastest is reported")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    train, _ = synthetic(rng, args.exits, args.samples, args.classes)
    test, test_targets = synthetic(rng, args.exits, args.samples, args.classes)
    train_targets = rng.integers(0, args.classes, size=args.samples)  # not used by the search
    costs = np.cumsum(np.linspace(0.5, 2.0, args.exits))
    budgets = range(1, 60)

    start = time.perf_counter()
    reference = loop_sweep(train, test, test_targets, costs, budgets)
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    reference_lists = loop_sweep(train, test, test_targets, costs, budgets, lists=True)
    lists_s = time.perf_counter() - start

    fast_s = math.inf
    for _ in range(args.repeat):
        start = time.perf_counter()
        sweep = policy.budget_sweep(train, train_targets, test, test_targets, costs, budgets)
        fast_s = min(fast_s, time.perf_counter() - start)

    for rows in (reference, reference_lists):
        for i, (t, acc, cost) in enumerate(rows):
            assert np.array_equal(sweep.thresholds[i], t), f"thresholds differ at budget {budgets[i]}"
            assert sweep.accuracy[i] == acc, f"accuracy differs at budget {budgets[i]}"
            assert sweep.cost[i] == cost, f"expected cost differs at budget {budgets[i]}"

    print(f"machine: {platform.processor() or platform.machine()} ({os.cpu_count()} CPUs), "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print(f"data: {args.samples} samples x {args.classes} classes x {args.exits} exits, {len(budgets)} budgets")
    print(f"official-style per-sample loop (numpy indexing): {loop_s * 1e3:9.1f} ms")
    print(f"  same loop over Python lists (reference)      : {lists_s * 1e3:9.1f} ms")
    print(f"budget_sweep (best of {args.repeat})                      : {fast_s * 1e3:9.1f} ms")
    print("results identical (thresholds, accuracy, expected cost)")
    print(f"speed-up vs official-style loop: {loop_s / fast_s:.0f}x  (vs the list loop: {lists_s / fast_s:.0f}x)")


if __name__ == "__main__":
    main()
