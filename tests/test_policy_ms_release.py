"""The MindSpore release's threshold search (``rule="mindspore"`` of dvt_core.runtime.policy).

The expected values come from a plain loop written from the rule in words (float64 fractions,
``floor(n * q)``, a sample taken by an earlier exit only when strictly above its threshold), not from
the module under test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from dvt_core.runtime import policy as P


def ms_rule_thresholds(conf: np.ndarray, p: int) -> np.ndarray:
    n_exits, n = conf.shape
    q = [math.exp(math.log(p / 20) * k) for k in range(1, n_exits + 1)]
    total = 0.0
    for v in q:
        total += v
    q = [v / total for v in q]
    taken = np.zeros(n, dtype=bool)
    t = np.full(n_exits, 1e8)
    for k in range(n_exits - 1):
        want, count = math.floor(n * q[k]), 0
        for i in sorted(range(n), key=lambda i: -conf[k, i]):
            if not taken[i]:
                count += 1
                if count == want:
                    t[k] = conf[k, i]
                    break
        taken |= conf[k] > t[k]
    t[-1] = -1e8
    return t.astype(np.float32)


def _probs(rng, n_exits, n, classes=4, tie_levels=None):
    logits = rng.standard_normal((n_exits, n, classes)).astype(np.float32)
    if tie_levels:
        logits = np.round(logits * tie_levels) / tie_levels  # many equal confidences
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("n_exits,n,ties", [(2, 9, None), (2, 50, 2), (3, 40, 2), (3, 64, None), (4, 30, 1)])
def test_matches_the_rule_in_words(n_exits, n, ties):
    probs = _probs(np.random.default_rng(n * n_exits), n_exits, n, tie_levels=ties)
    conf = probs.max(-1)
    targets = np.zeros(n, dtype=np.int64)
    sweep = P.budget_sweep(probs, targets, probs, targets, np.arange(1, n_exits + 1), rule="mindspore")
    assert list(sweep.budgets) == list(range(1, 40))
    for i, p in enumerate(range(1, 40)):
        want = ms_rule_thresholds(conf, p)
        np.testing.assert_array_equal(sweep.thresholds[i], want, err_msg=f"p={p}")
        got = P.find_thresholds(probs, P.budget_fractions(p, n_exits, rule="mindspore"), rule="mindspore")
        np.testing.assert_array_equal(got, want, err_msg=f"p={p}")
    if n_exits > 2:  # the strict rule is really exercised: the PyTorch rule, same fractions, differs
        assert any(not np.array_equal(P.find_thresholds(probs, P.budget_fractions(p, n_exits, rule="mindspore")),
                                      sweep.thresholds[i]) for i, p in enumerate(range(1, 40)))


def test_two_exit_results_can_differ_from_the_pytorch_rule():
    """n = 9, p = 16: float64 gives floor(9 * 5/9) = 5 samples at exit 1, float32 gives 4."""
    assert math.floor(9 * P.budget_fractions(16, 2, rule="mindspore")[0]) == 5
    assert math.floor(np.float32(9) * P.budget_fractions(16, 2)[0]) == 4
    conf = np.linspace(0.9, 0.5, 9, dtype=np.float32)
    probs = np.stack([np.stack([conf, 1 - conf], -1)] * 2)
    ms = P.find_thresholds(probs, P.budget_fractions(16, 2, rule="mindspore"), rule="mindspore")
    pt = P.find_thresholds(probs, P.budget_fractions(16, 2))
    assert ms[0] == conf[4] and pt[0] == conf[3]


def test_strictness_never_matters_with_two_exits():
    probs = _probs(np.random.default_rng(5), 2, 200, tie_levels=1)
    for p in range(1, 40):
        fr = P.budget_fractions(p, 2, rule="mindspore")
        np.testing.assert_array_equal(P.find_thresholds(probs, fr, rule="mindspore"), P.find_thresholds(probs, fr))


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match="unknown rule 'tf'"):
        P.budget_fractions(3, 2, rule="tf")
