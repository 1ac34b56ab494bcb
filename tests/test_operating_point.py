"""dvt_core.runtime.operating_point: MAC budgets as users write them, the operating-point choice, the calibration
metadata a checkpoint stores, and ``model.adaptive(images)`` falling back on the stored default."""
from __future__ import annotations

import numpy as np
import pytest

import dvt_core
from dvt_core.runtime import operating_point as op
from dvt_core.runtime import policy
from dvt_core.errors import InputError

SPEC = dvt_core.get_spec("dvt_fashion_mnist")
COSTS = dvt_core.exit_macs(SPEC)  # the costs op.calibrate reads from the spec; MAC counts are tested in test_macs


@pytest.mark.parametrize("text,value", [
    ("5000000", 5e6), ("5e6", 5e6), ("5M", 5e6), ("5.17m", 5.17e6), ("300K", 3e5), ("1.2G", 1.2e9),
    (" 4M MACs", 4e6), (".5M", 5e5), (7, 7.0),
])
def test_parse_macs(text, value):
    assert op.parse_macs(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "5Q", "M", "five", "-5M", "0", "inf", "nan", "5 M M"])
def test_parse_macs_refuses(text):
    with pytest.raises(InputError):
        op.parse_macs(text)


def test_format_macs_reads_back():
    assert op.parse_macs(op.format_macs(5170096)) == pytest.approx(5.17e6)


def _probs(n=400, classes=5, seed=0):
    """Synthetic per-exit probabilities: later exits are sharper and more often right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    out = []
    for k, skill in enumerate((0.8, 1.6, 2.4)):
        logits = rng.normal(size=(n, classes))
        logits[np.arange(n), labels] += skill * rng.uniform(0, 2, n)
        out.append(policy.softmax(logits))
    return np.stack(out).astype(np.float32), labels


def _reference_choice(probs, labels, budget):
    """The choice written with policy's own primitives: the budget sweep plus the exit corners, then
    :func:`policy.thresholds_for_cost` (most accurate that fits, then cheapest, then first)."""
    sweep = policy.budget_sweep(probs, labels, probs, labels, COSTS)
    ts, accs, cs = [], [], []
    for k in range(3):
        t = np.full(3, policy.NEVER, np.float32)
        t[k] = t[-1] = policy.ALWAYS
        a, c = policy.evaluate(probs, labels, t, COSTS)
        ts.append(t), accs.append(a), cs.append(c)
    full = policy.BudgetSweep(np.concatenate([sweep.budgets, np.zeros(3)]),
                              np.concatenate([sweep.fractions, np.eye(3, dtype=np.float32)]),
                              np.concatenate([sweep.thresholds, np.stack(ts)]),
                              np.concatenate([sweep.accuracy, accs]), np.concatenate([sweep.cost, cs]))
    return policy.thresholds_for_cost(full, budget)


@pytest.mark.parametrize("budget", [1.06e6, 2.5e6, 6e6, 1.2e7, 2.1e7])
def test_calibrate_matches_the_policy_primitives(budget):
    probs, labels = _probs()
    found = op.calibrate(probs, labels, SPEC, budget)
    t = np.float32(found["thresholds"])
    np.testing.assert_array_equal(t, _reference_choice(probs, labels, budget))
    acc, cost = policy.evaluate(probs, labels, t, COSTS)
    block = found["calibration"]
    assert block["holdout_accuracy"] == pytest.approx(acc) and block["holdout_macs"] == pytest.approx(cost)
    assert cost <= budget and block["images"] == len(labels)
    assert sum(block["exit_shares"]) == pytest.approx(1.0)
    assert ("budget_index" in block) != ("policy" in block)
    assert len(found["budgets"]) == 59


def test_stored_table_gives_back_the_calibrated_choice():
    """What `dvt calibrate` stores lets `dvt predict --budget` find the same operating point."""
    probs, labels = _probs(seed=1)
    for budget in (1.5e6, 4e6, 9e6, 2.1e7):
        found = op.calibrate(probs, labels, SPEC, budget)
        meta = op.calibrated_meta({}, SPEC, found["thresholds"], found["calibration"], found["budgets"],
                                  holdout_anytime_accuracy=found["holdout_anytime_accuracy"])
        again = op.budget_operating_point(meta, budget, SPEC)
        assert again["thresholds"] == found["thresholds"]
        assert again["expected_macs"] == pytest.approx(found["calibration"]["holdout_macs"])


def test_budget_below_exit_one_and_empty_table():
    with pytest.raises(InputError, match="cheapest exit.*1053056"):
        op.budget_operating_point({"budgets": [{"thresholds": [0.5, 0.5, -1e8], "holdout_macs": 2e6}]}, 1e6, SPEC)
    with pytest.raises(InputError, match="no calibrated budgets"):
        op.budget_operating_point({}, 5e6, SPEC)
    # Below the table's cheapest entry, exit 1 alone serves (its accuracy unknown without anytime numbers).
    point = op.budget_operating_point({"budgets": [{"thresholds": [0.5, 0.5, -1e8], "holdout_macs": 3e6,
                                                    "holdout_accuracy": 90.0}]}, 2e6, SPEC)
    assert point["policy"] == "every image leaves at exit 1" and point["expected_accuracy"] is None


def test_calibrated_meta_replaces_the_old_default():
    old = {"arch": "dvt_fashion_mnist", "thresholds": [0.1, 0.1, -1e8], "default_budget": 7,
           "default_operating_point": {"rule": "x"}, "subset_adaptive": {}, "calibration": {"target_macs": 1},
           "budgets": [{"budget": 1}], "classes": ["a"]}
    new = op.calibrated_meta(old, SPEC, [0.9, 0.8, -1e8], {"target_macs": 5e6}, [{"budget": 2}])
    assert new["thresholds"] == [0.9, 0.8, -1e8] and new["calibration"] == {"target_macs": 5e6}
    assert not {"default_budget", "default_operating_point", "subset_adaptive"} & set(new)
    assert new["budgets"] == [{"budget": 1}] and new["classes"] == ["a"]  # the release's table is kept
    assert op.calibrated_meta(old, SPEC, [0.9, 0.8], budgets=[{"budget": 2}], keep_budgets=False)["budgets"] == \
        [{"budget": 2}]
    assert "calibration" not in op.calibrated_meta(old, SPEC, [0.9, 0.8])
    assert old["default_budget"] == 7, "the input is not modified"


def test_reaching_is_the_cheapest_that_reaches_the_target():
    table = [{"budget": 1, "holdout_accuracy": 80.0, "holdout_macs": 2.0},
             {"budget": 2, "holdout_accuracy": 91.0, "holdout_macs": 5.0},
             {"budget": 3, "holdout_accuracy": 92.0, "holdout_macs": 4.0}]
    assert op.reaching(table, 90.0)["budget"] == 3
    assert op.reaching(table, 95.0)["budget"] == 3  # none reaches: the most accurate
    assert op.reaching(table, 50.0)["budget"] == 1


# ---- model.adaptive(images) without thresholds ---------------------------------------------------------

def _subset(n=24):
    from helpers import SUBSET

    with np.load(SUBSET) as d:
        return d["images"][:n]


def _check_default_thresholds(backend: str, to_batch):
    from dvt_core.data import sources as data
    from dvt_core.runtime import evaluation

    model = dvt_core.build("dvt_fashion_mnist", backend=backend, weights="default")
    stored = model.checkpoint_meta["thresholds"]
    images = _subset()
    batch = to_batch(data.normalize(images, SPEC.mean, SPEC.std))
    default, given = model.adaptive(batch), model.adaptive(batch, stored)
    np.testing.assert_array_equal(default.exit_index, given.exit_index)
    np.testing.assert_array_equal(default.prediction, given.prediction)
    assert len(set(default.exit_index.tolist())) > 1, "the stored default sends images out at several exits"
    everything_late = model.adaptive(batch, [1e8, 1e8])
    assert (everything_late.exit_index == 2).all()  # thresholds given still win
    np.testing.assert_array_equal(evaluation.adaptive(model, images).exit_index, default.exit_index)

    bare = dvt_core.build("dvt_fashion_mnist", backend=backend)
    with pytest.raises(InputError, match="built without weights.*no default thresholds"):
        bare.adaptive(batch)
    bare.checkpoint_meta = {"arch": "dvt_fashion_mnist"}  # a checkpoint that was never calibrated
    with pytest.raises(InputError, match="stores no default thresholds.*dvt calibrate"):
        bare.adaptive(batch)


def test_torch_adaptive_uses_the_stored_default():
    import torch

    _check_default_thresholds("torch", torch.from_numpy)


@pytest.mark.mindspore
def test_mindspore_adaptive_uses_the_stored_default():
    pytest.importorskip("mindspore")
    from dvt_backends.mindspore import compat

    _check_default_thresholds("mindspore", compat.to_tensor)
