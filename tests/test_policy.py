"""Exit policy (dvt_core.runtime.policy): conformance with the official threshold search, and its contract.

The conformance tests read ``../shared/conformance/official_budgeted_policy.npz`` (thresholds,
accuracy and expected FLOPs of the official ``dynamic_find_threshold`` / ``dynamic_evaluate`` for
budgets 1..59). The other tests compare the vectorised code with a plain per-sample loop written
here, on random data with many ties and on degenerate fractions.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dvt_core.runtime import policy as P

CONFORMANCE = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"
FIXTURE = CONFORMANCE / "official_budgeted_policy.npz"


# --------------------------------------------------------------------------------------------------
# a straightforward per-sample reference (the rule of the conformance README, one sample at a time)


def reference_thresholds(conf: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    n_exits, n = conf.shape
    thresholds = [1e8] * n_exits
    taken = [False] * n
    for k in range(n_exits - 1):
        wanted = math.floor(fractions[k] * n)  # float32 fractions -> float32 product, as officially
        seen = 0
        for i in sorted(range(n), key=lambda j: -conf[k][j]):
            if not taken[i]:
                seen += 1
                if seen == wanted:
                    thresholds[k] = conf[k][i]
                    break
        for i in range(n):
            if conf[k][i] >= thresholds[k]:
                taken[i] = True
    thresholds[-1] = -1e8
    return np.asarray(thresholds, dtype=np.float32)


def reference_evaluate(conf, preds, targets, thresholds, costs):
    n_exits, n = conf.shape
    correct, total_cost = 0, 0.0
    for i in range(n):
        for k in range(n_exits):
            if conf[k][i] >= thresholds[k] or k == n_exits - 1:
                correct += int(preds[k][i] == targets[i])
                total_cost += costs[k]
                break
    return correct * 100.0 / n, total_cost / n


def tied_probs(rng, n_exits=3, n=300, n_classes=5):
    """Softmax of small integer logits: few distinct max probabilities, so many exact ties."""
    return P.softmax(rng.integers(0, 3, size=(n_exits, n, n_classes)).astype(np.float32))


def smooth_probs(rng, n_exits=3, n=300, n_classes=10):
    return P.softmax((rng.standard_normal((n_exits, n, n_classes)) * 3).astype(np.float32))


# --------------------------------------------------------------------------------------------------
# conformance with the official release


@pytest.fixture(scope="module")
def official():
    if not FIXTURE.exists():
        pytest.skip(f"conformance fixture not found at {FIXTURE} (the shared/ checkout sits next to the repo)")
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


@pytest.mark.conformance
def test_official_per_budget(official):
    n_exits = official["train_probs"].shape[0]
    for p in range(1, 60):
        t = P.find_thresholds(official["train_probs"], P.budget_fractions(p, n_exits))
        assert t.dtype == np.float32
        np.testing.assert_array_equal(t, official["thresholds"][p - 1], err_msg=f"budget {p}")
        acc, cost = P.evaluate(official["test_probs"], official["test_targets"], t, official["flops"])
        assert acc == pytest.approx(official["accuracy"][p - 1], abs=1e-6), p
        assert cost == pytest.approx(official["expected_flops"][p - 1], abs=1e-6), p


@pytest.mark.conformance
def test_official_budget_sweep(official):
    sweep = P.budget_sweep(official["train_probs"], official["train_targets"],
                           official["test_probs"], official["test_targets"], official["flops"])
    assert len(sweep) == 59
    assert sweep.thresholds.dtype == np.float32
    np.testing.assert_array_equal(sweep.thresholds, official["thresholds"])
    np.testing.assert_allclose(sweep.accuracy, official["accuracy"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(sweep.cost, official["expected_flops"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(sweep.fractions[4], P.budget_fractions(5, 3))


@pytest.mark.conformance
def test_official_thresholds_for_cost(official):
    sweep = P.budget_sweep(official["train_probs"], official["train_targets"],
                           official["test_probs"], official["test_targets"], official["flops"])
    limit = float(np.median(sweep.cost))
    t = P.thresholds_for_cost(sweep, limit)
    acc, cost = P.evaluate(official["test_probs"], official["test_targets"], t, official["flops"])
    assert cost <= limit
    assert acc == sweep.accuracy[sweep.cost <= limit].max()


# --------------------------------------------------------------------------------------------------
# budget fractions


def test_budget_fractions_rule():
    q = P.budget_fractions(5, 3)
    assert q.dtype == np.float32 and q.shape == (3,)
    assert q.sum() == pytest.approx(1.0, abs=1e-6)
    expected = np.array([0.25, 0.25 ** 2, 0.25 ** 3])
    np.testing.assert_allclose(q, expected / expected.sum(), rtol=1e-6)
    np.testing.assert_allclose(P.budget_fractions(20, 4), np.full(4, 0.25), rtol=1e-6)
    assert (np.diff(P.budget_fractions(40, 3)) > 0).all()  # p > 20 favours late exits


# --------------------------------------------------------------------------------------------------
# vectorised code against the reference loop

DEGENERATE_FRACTIONS = [
    [0.0, 0.0, 1.0],       # nobody leaves early: both early thresholds are 1e8
    [1.0, 0.0, 0.0],       # everybody at exit 0
    [0.6, 0.6, 0.0],       # exit 1 asks for more samples than are left
    [0.5, 0.5, 0.0],       # exit 1 asks for exactly what is left (unless ties took more)
    [1 / 300, 1 / 300, 0.0],  # one sample each
    [0.999, 0.001, 0.0],
    [0.2, 0.3, 0.5],
]


@pytest.mark.parametrize("fractions", DEGENERATE_FRACTIONS)
@pytest.mark.parametrize("make", [tied_probs, smooth_probs])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop(make, fractions, seed):
    rng = np.random.default_rng(seed)
    probs = make(rng)
    fr = np.asarray(fractions, dtype=np.float32)
    conf = P.confidence(probs)
    expected = reference_thresholds(conf, fr)
    got = P.find_thresholds(probs, fr)
    np.testing.assert_array_equal(got, expected)

    test_probs = make(rng)
    targets = rng.integers(0, probs.shape[2], size=probs.shape[1])
    costs = np.array([1.0, 2.5, 4.0])
    acc, cost = P.evaluate(test_probs, targets, got, costs)
    ref_acc, ref_cost = reference_evaluate(P.confidence(test_probs), test_probs.argmax(axis=2), targets, got, costs)
    assert acc == pytest.approx(ref_acc, abs=1e-9)
    assert cost == pytest.approx(ref_cost, abs=1e-9)


def test_ties_are_really_exercised():
    conf = P.confidence(tied_probs(np.random.default_rng(0)))
    assert np.unique(conf[0]).size < conf.shape[1] // 10


@pytest.mark.parametrize("n_exits", [1, 2, 4])
def test_other_exit_counts(n_exits):
    rng = np.random.default_rng(n_exits)
    probs = tied_probs(rng, n_exits=n_exits, n=200)
    for p in (1, 7, 20, 33, 59):
        fr = P.budget_fractions(p, n_exits)
        np.testing.assert_array_equal(P.find_thresholds(probs, fr), reference_thresholds(P.confidence(probs), fr))
    assert P.find_thresholds(probs, P.budget_fractions(3, n_exits))[-1] == np.float32(-1e8)


@pytest.mark.parametrize("n_exits", [2, 3, 4])
@pytest.mark.parametrize("make", [tied_probs, smooth_probs])
def test_budget_sweep_matches_per_budget_calls(make, n_exits):
    rng = np.random.default_rng(7)
    train, test = make(rng, n_exits=n_exits, n=400), make(rng, n_exits=n_exits, n=350)
    y_train = rng.integers(0, train.shape[2], size=400)
    y_test = rng.integers(0, test.shape[2], size=350)
    costs = np.cumsum(np.arange(1, n_exits + 1) * 0.5)
    budgets = [1, 2.5, 10, 20, 41, 59]
    sweep = P.budget_sweep(train, y_train, test, y_test, costs, budgets=budgets)
    np.testing.assert_array_equal(sweep.budgets, budgets)
    for i, p in enumerate(budgets):
        fr = P.budget_fractions(p, n_exits)
        np.testing.assert_array_equal(sweep.fractions[i], fr)
        t = P.find_thresholds(train, fr)
        np.testing.assert_array_equal(sweep.thresholds[i], t)
        np.testing.assert_array_equal(t, reference_thresholds(P.confidence(train), fr))
        assert (sweep.accuracy[i], sweep.cost[i]) == P.evaluate(test, y_test, t, costs)


# --------------------------------------------------------------------------------------------------
# confidences


def test_softmax_is_stable_and_normalised():
    logits = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1000.0]])
    s = P.softmax(logits)
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s.sum(axis=-1), 1.0)
    np.testing.assert_allclose(s[0], P.softmax(logits[0] - 1000.0))
    np.testing.assert_allclose(s[1], np.full(3, 1 / 3))


def test_max_softmax_confidence():
    probs = np.array([[[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]]], dtype=np.float32)
    conf = P.confidence(probs)
    assert conf.shape == (1, 2) and conf.dtype == np.float32
    np.testing.assert_array_equal(conf, np.array([[0.7, 0.5]], dtype=np.float32))


def test_entropy_confidence():
    probs = np.array([[[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]])
    conf = P.confidence(probs, kind="entropy")
    assert conf.shape == (1, 3)
    np.testing.assert_allclose(conf[0, :2], [0.0, -1.0], atol=1e-7)
    assert -1.0 < conf[0, 2] < 0.0  # higher = more confident, so the >= rule applies unchanged
    assert conf[0, 0] > conf[0, 2] > conf[0, 1]


def test_entropy_policy_matches_reference():
    rng = np.random.default_rng(3)
    probs = smooth_probs(rng)
    conf = P.confidence(probs, "entropy")
    for p in (4, 20, 50):
        fr = P.budget_fractions(p, 3)
        t = P.find_thresholds(probs, fr, confidence_kind="entropy")
        np.testing.assert_array_equal(t, reference_thresholds(conf, fr))
        np.testing.assert_array_equal(P.assign_exits(probs, t, confidence_kind="entropy"), P.assign_exits(conf, t))
    targets = rng.integers(0, 10, size=300)
    costs = [1.0, 2.0, 3.0]
    t = P.find_thresholds(probs, P.budget_fractions(10, 3), "entropy")
    sweep = P.budget_sweep(probs, targets, probs, targets, costs, budgets=[10], confidence_kind="entropy")
    np.testing.assert_array_equal(sweep.thresholds[0], t)
    assert (sweep.accuracy[0], sweep.cost[0]) == P.evaluate(probs, targets, t, costs, confidence_kind="entropy")


# --------------------------------------------------------------------------------------------------
# assign_exits, anytime accuracy, thresholds_for_cost


def test_assign_exits():
    conf = np.array([[0.9, 0.2, 0.5, 0.1],
                     [0.9, 0.8, 0.5, 0.2],
                     [0.9, 0.9, 0.1, 0.3]], dtype=np.float32)
    t = np.array([0.5, 0.8, -1e8], dtype=np.float32)
    exits = P.assign_exits(conf, t)
    assert exits.dtype == np.int64
    np.testing.assert_array_equal(exits, [0, 1, 0, 2])  # 0.5 >= 0.5 leaves at exit 0: the rule is >=
    # The last exit takes every sample left, whatever its threshold says.
    np.testing.assert_array_equal(P.assign_exits(conf, [1e8, 1e8, 1e8]), [2, 2, 2, 2])
    # Probabilities work too (their max-softmax confidence is used).
    probs = np.stack([conf, 1 - conf], axis=-1)
    t = [0.85, 0.85, -1e8]
    np.testing.assert_array_equal(P.assign_exits(probs, t), P.assign_exits(probs.max(axis=-1), t))
    np.testing.assert_array_equal(P.assign_exits(probs, t), [0, 2, 2, 0])  # max(c, 1 - c) per exit


def test_anytime_accuracy():
    probs = np.array([[[0.9, 0.1], [0.8, 0.2]], [[0.1, 0.9], [0.3, 0.7]]])
    np.testing.assert_allclose(P.anytime_accuracy(probs, np.array([0, 1])), [50.0, 50.0])
    np.testing.assert_allclose(P.anytime_accuracy(probs, np.array([1, 1])), [0.0, 100.0])


def _sweep():
    return P.BudgetSweep(
        budgets=np.array([1.0, 2.0, 3.0, 4.0]),
        fractions=np.full((4, 3), 1 / 3, dtype=np.float32),
        thresholds=np.arange(12, dtype=np.float32).reshape(4, 3),
        accuracy=np.array([60.0, 70.0, 70.0, 80.0]),
        cost=np.array([1.0, 2.5, 2.0, 3.0]),
    )


def test_thresholds_for_cost():
    sweep = _sweep()
    np.testing.assert_array_equal(P.thresholds_for_cost(sweep, 10.0), sweep.thresholds[3])
    # 2.0 and 2.5 are equally accurate: the cheaper one wins.
    np.testing.assert_array_equal(P.thresholds_for_cost(sweep, 2.9), sweep.thresholds[2])
    np.testing.assert_array_equal(P.thresholds_for_cost(sweep, 1.0), sweep.thresholds[0])
    out = P.thresholds_for_cost(sweep, 10.0)
    out[0] = -1
    assert sweep.thresholds[3, 0] == 9  # a copy, not a view
    with pytest.raises(ValueError, match=r"cheapest achievable is 1 "):
        P.thresholds_for_cost(sweep, 0.5)


# --------------------------------------------------------------------------------------------------
# input validation


def test_errors():
    rng = np.random.default_rng(0)
    probs = smooth_probs(rng, n=20)
    targets = rng.integers(0, 10, size=20)
    costs = [1.0, 2.0, 3.0]
    t = P.find_thresholds(probs, P.budget_fractions(10, 3))
    with pytest.raises(ValueError, match="exits, samples, classes"):
        P.confidence(probs[0])
    with pytest.raises(ValueError, match="unknown confidence kind"):
        P.confidence(probs, kind="margin")
    with pytest.raises(ValueError, match="unknown confidence kind"):
        P.find_thresholds(probs[:1], [1.0], confidence_kind="margin")
    with pytest.raises(ValueError, match="budget indices must be positive"):
        P.budget_sweep(probs, targets, probs, targets, costs, budgets=[1, -2])
    with pytest.raises(ValueError, match="fractions has 2 values but there are 3 exits"):
        P.find_thresholds(probs, [0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        P.find_thresholds(probs, [-0.1, 0.5, 0.6])
    with pytest.raises(ValueError, match="targets has 19 samples but the probabilities have 20"):
        P.evaluate(probs, targets[:19], t, costs)
    with pytest.raises(ValueError, match=r"targets must be shaped \(samples,\)"):
        P.evaluate(probs, targets[None], t, costs)
    with pytest.raises(ValueError, match="must lie in"):
        P.evaluate(probs, targets + 10, t, costs)
    with pytest.raises(ValueError, match="costs has 2 values but there are 3 exits"):
        P.evaluate(probs, targets, t, costs[:2])
    with pytest.raises(ValueError, match="thresholds has 2 values"):
        P.assign_exits(probs, t[:2])
    with pytest.raises(ValueError, match="confidences"):
        P.assign_exits(np.zeros(5), t)
    with pytest.raises(ValueError, match="NaN"):
        P.assign_exits(np.full((3, 4), np.nan), t)
    with pytest.raises(ValueError, match="train_probs has 3 exits but test_probs has 2"):
        P.budget_sweep(probs, targets, probs[:2], targets, costs)
    with pytest.raises(ValueError, match="train_targets has 19 samples"):
        P.budget_sweep(probs, targets[:19], probs, targets, costs)
    with pytest.raises(ValueError, match="costs has 4 values"):
        P.budget_sweep(probs, targets, probs, targets, costs + [4.0])
    with pytest.raises(ValueError, match="positive"):
        P.budget_fractions(0, 3)
    with pytest.raises(ValueError, match="num_exits"):
        P.budget_fractions(5, 0)


def test_numpy_only():
    code = "import sys, dvt_core.runtime.policy; assert not {'torch', 'mindspore'} & set(sys.modules), 'framework imported'"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
