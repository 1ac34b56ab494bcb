"""True early exit (``DVT.adaptive``) against the all-exit run plus the exit policy.

``model.adaptive(images, thresholds)`` must give, image by image, what running every exit
(``model(images)``) and applying :mod:`dvt_core.runtime.policy` gives: the exit taken, its prediction,
confidence and logits, and the MACs of that exit (``exit_macs``). Images whose confidence lies within
``TIE`` of a threshold are left out of the exact comparison: a later stage runs on a smaller batch in
early exit, so its float32 logits may differ from the full batch's in the last bits.

Early exit must also do no work on finished images: spies on every stage's ``forward`` record the
images and reused features / attention logits each stage is handed, and later stages must see exactly
the rows of the images still going (and the full run's reuse tensors for those rows, nothing more).

The synthetic models are small overrides of both families (T2T-ViT and DeiT/ViT), with both reuses
and each ablation; their linear layers are re-drawn with larger weights so the confidences spread
over the whole range (at the default init every exit answers about 1/num_classes for every image).
The last test runs the shipped Fashion-MNIST DVT on the shipped 1,000-image test subset and
reproduces the accuracy and mean MACs its release tool stored (``policy.evaluate`` on all exits).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dvt_core
from dvt_core import InputError
from dvt_core.runtime import evaluation
from dvt_core.runtime import policy
from dvt_core.runtime.early_exit import exit_confidence, normalize_thresholds
from dvt_core.model.macs import exit_macs

from helpers import FAMILIES, TIE, assert_matches, full_run, make_images, reference, small_model, spread_thresholds

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO / "dvt_core" / "assets" / "fashion_mnist_test_subset.npz"


SMALL = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, grids=(2, 3, 4), num_classes=10)
ABLATIONS = [(True, True), (True, False), (False, True), (False, False)]


# ---- helpers ------------------------------------------------------------------------------------


class StageSpy:
    """Records what each stage's ``forward`` is handed: images and the reused tensors."""

    def __init__(self, model, monkeypatch):
        self.calls: list[dict] = []
        for stage in model.stages:
            monkeypatch.setattr(stage, "forward", self._wrap(stage, stage.forward))

    def _wrap(self, stage, forward):
        def spy(images, reuse=None, keep_relations=True):
            self.calls.append(dict(
                index=stage.index, images=images.detach().clone(), keep_relations=keep_relations,
                features=None if reuse is None or reuse.features is None else reuse.features.detach().clone(),
                relations=None if reuse is None or reuse.relations is None else torch.cat(reuse.relations, 1).detach().clone()))
            return forward(images, reuse, keep_relations)
        return spy

    def reset(self):
        self.calls.clear()


def check_no_work_on_finished(spy_full: list[dict], spy_adaptive: list[dict], images: torch.Tensor,
                              exits: np.ndarray, model):
    """Stage i ran on exactly the images with exit >= i, with the full run's reuse rows of them."""
    spec = model.spec
    stages_run = [c["index"] for c in spy_adaptive]
    last_needed = int(exits.max())
    assert stages_run == list(range(last_needed + 1)), "stages run out of order or beyond the last exit taken"
    full = {c["index"]: c for c in spy_full}
    for call in spy_adaptive:
        i = call["index"]
        rows = np.flatnonzero(exits >= i)
        b = len(rows)
        assert call["images"].shape[0] == b, f"stage {i} saw {call['images'].shape[0]} images, {b} were left"
        assert torch.equal(call["images"], images[torch.as_tensor(rows)]), f"stage {i} got the wrong images"
        if i == 0:
            assert call["features"] is None and call["relations"] is None
            continue
        idx = torch.as_tensor(rows)
        if spec.feature_reuse:
            assert call["features"] is not None and call["features"].shape[0] == b
            torch.testing.assert_close(call["features"], full[i]["features"][idx], rtol=0, atol=TIE)
        else:
            assert call["features"] is None
        if spec.relation_reuse:
            assert call["relations"] is not None and call["relations"].shape[0] == b
            torch.testing.assert_close(call["relations"], full[i]["relations"][idx], rtol=0, atol=TIE)
        else:
            assert call["relations"] is None
        # the last stage keeps no attention logits: nothing would reuse them
        assert call["keep_relations"] == (spec.relation_reuse and i < spec.num_exits - 1)


def run_both(model, images, thresholds, monkeypatch, kind="max_softmax"):
    """(adaptive result, policy reference, spy records of the full run and of the adaptive run)."""
    spy = StageSpy(model, monkeypatch)
    logits, conf = full_run(model, images, kind)
    full_calls = list(spy.calls)
    spy.reset()
    result = model.adaptive(images, thresholds, confidence=kind)
    ref = reference(logits, conf, thresholds, exit_macs(model.spec))
    return result, ref, full_calls, list(spy.calls)


# ---- synthetic models ---------------------------------------------------------------------------

@pytest.mark.parametrize("feature_reuse,relation_reuse", ABLATIONS,
                         ids=["both", "features-only", "relations-only", "no-reuse"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_adaptive_equals_full_run_plus_policy(family, feature_reuse, relation_reuse, monkeypatch):
    model = small_model(family, feature_reuse, relation_reuse)
    images = make_images(model)
    _, conf = full_run(model, images)
    thresholds = spread_thresholds(conf)
    result, ref, full_calls, calls = run_both(model, images, thresholds, monkeypatch)
    assert not ref["ambiguous"].any()
    counts = np.bincount(ref["exit"], minlength=3)
    assert (counts >= 4).all(), f"thresholds {thresholds} should spread the images over every exit: {counts}"
    assert_matches(result, ref, model.spec.num_exits)
    np.testing.assert_array_equal(result.exit_counts, counts)
    check_no_work_on_finished(full_calls, calls, images, ref["exit"], model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_entropy_confidence(family, monkeypatch):
    model = small_model(family)
    images = make_images(model, seed=3)
    _, conf = full_run(model, images, "entropy")
    assert (conf <= 0).all() and (conf >= -1).all()
    thresholds = spread_thresholds(conf)
    result, ref, full_calls, calls = run_both(model, images, thresholds, monkeypatch, kind="entropy")
    assert not ref["ambiguous"].any()
    assert (np.bincount(ref["exit"], minlength=3) > 0).all()
    assert_matches(result, ref, model.spec.num_exits)
    check_no_work_on_finished(full_calls, calls, images, ref["exit"], model)
    # the confidence reported is the entropy one, not the max-softmax one
    _, conf_ms = full_run(model, images)
    assert (result.confidence <= 0).all() and not np.allclose(result.confidence, conf_ms[ref["exit"], np.arange(len(images))])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batch_of_one(family, monkeypatch):
    """Single images, each sent to a different exit by thresholds from the batch's confidences."""
    model = small_model(family)
    images = make_images(model, n=16, seed=5)
    _, conf = full_run(model, images)
    thresholds = spread_thresholds(conf)
    exits = policy.assign_exits(conf, normalize_thresholds(thresholds, 3))
    picks = [int(np.flatnonzero(exits == k)[0]) for k in range(3)]
    for j in picks:
        one = images[j:j + 1]
        result, ref, full_calls, calls = run_both(model, one, thresholds, monkeypatch)
        assert int(ref["exit"][0]) == int(exits[j])
        assert not ref["ambiguous"].any()
        assert_matches(result, ref, 3)
        check_no_work_on_finished(full_calls, calls, one, ref["exit"], model)
        assert len(calls) == int(exits[j]) + 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_everyone_leaves_at_the_first_exit(family, monkeypatch):
    model = small_model(family)
    images = make_images(model, n=8, seed=7)
    logits, conf = full_run(model, images)
    # max-softmax is at least 1/classes; a threshold at the batch minimum keeps ties leaving too
    for thresholds in ([0.0, 0.0], [float(conf[0].min()), 2.0], [-np.inf, np.inf]):
        result, ref, full_calls, calls = run_both(model, images, thresholds, monkeypatch)
        assert (result.exit_index == 0).all()
        assert [c["index"] for c in calls] == [0], "later stages ran although every image had left"
        np.testing.assert_array_equal(result.exit_counts, [8, 0, 0])
        np.testing.assert_array_equal(result.macs, np.full(8, exit_macs(model.spec)[0]))
        np.testing.assert_allclose(result.logits, logits[0], rtol=0, atol=TIE)
        assert_matches(result, ref, 3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_nobody_leaves_early(family, monkeypatch):
    model = small_model(family)
    images = make_images(model, n=8, seed=8)
    logits, conf = full_run(model, images)
    for thresholds in ([1.5, 1.5], [1e8, 1e8], [np.inf, np.inf], [1.5, 1.5, 1.5]):
        result, ref, full_calls, calls = run_both(model, images, thresholds, monkeypatch)
        assert (result.exit_index == 2).all()
        np.testing.assert_array_equal(result.exit_counts, [0, 0, 8])
        assert [c["index"] for c in calls] == [0, 1, 2]
        assert all(c["images"].shape[0] == 8 for c in calls)
        np.testing.assert_allclose(result.logits, logits[2], rtol=0, atol=TIE)
        assert_matches(result, ref, 3)
        check_no_work_on_finished(full_calls, calls, images, ref["exit"], model)


def testexit_confidence_is_the_policy_confidence_bit_for_bit():
    # the loop's lean max-softmax (1 / sum) must equal what thresholds are found on (policy.confidence of
    # policy.softmax) in every bit, or an image on a threshold would leave in one and go on in the other
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, c = int(rng.integers(1, 70)), int(rng.integers(2, 1001))
        logits = (rng.standard_normal((n, c)) * rng.choice([1e-3, 1.0, 30.0, 300.0])).astype(np.float32)
        for kind in policy.CONFIDENCE_KINDS:
            got = exit_confidence(logits, kind)
            want = policy.confidence(policy.softmax(logits)[None], kind=kind)[0]
            assert got.dtype == np.float32 and got.shape == (n,)
            np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


def test_threshold_count_and_last_threshold_ignored():
    """num_exits - 1 thresholds, or num_exits with any last value (the last exit takes everyone left);
    lists, numpy and torch thresholds all work."""
    model = small_model("vit")
    images = make_images(model, seed=11)
    _, conf = full_run(model, images)
    t = spread_thresholds(conf)
    base = model.adaptive(images, t)
    assert (base.exit_counts > 0).all()
    variants = [t + [-1e8], t + [1e8], t + [0.5], t + [np.inf], np.float32(t), torch.tensor(t), tuple(t)]
    for v in variants:
        r = model.adaptive(images, v)
        np.testing.assert_array_equal(r.exit_index, base.exit_index)
        np.testing.assert_array_equal(r.prediction, base.prediction)
        np.testing.assert_array_equal(r.logits, base.logits)
        np.testing.assert_array_equal(r.macs, base.macs)
    np.testing.assert_array_equal(normalize_thresholds(t, 3), np.float32(t + [-1e8]))
    assert normalize_thresholds(t + [7.0], 3)[-1] == np.float32(-1e8)


@pytest.mark.parametrize("bad", [
    [], [0.5], [0.5, 0.5, 0.5, 0.5], [[0.5, 0.5, 0.5, 0.5]],  # wrong length
    [np.nan, 0.5], [0.5, np.nan], [np.nan, np.nan, 0.5],  # NaN where it matters
], ids=["none", "one", "four", "four-nested", "nan-first", "nan-second", "nan-with-last"])
def test_bad_thresholds_raise_input_error(bad):
    model = small_model("vit")
    with pytest.raises(InputError, match="threshold"):
        model.adaptive(make_images(model, n=2), bad)
    with pytest.raises(InputError):
        normalize_thresholds(bad, 3)


def test_bad_confidence_kind_and_images_raise():
    model = small_model("vit")
    with pytest.raises(ValueError, match="confidence"):
        model.adaptive(make_images(model, n=2), [0.5, 0.5], confidence="margin")
    with pytest.raises(InputError):
        model.adaptive(make_images(model, n=2)[:, :, :16], [0.5, 0.5])
    with pytest.raises(InputError, match="expected an image batch"):
        model.adaptive("images.png", [0.5, 0.5])


def test_numpy_images_give_the_tensor_answer():
    """preprocess() returns numpy: adaptive takes it as it takes the framework's tensors."""
    model = small_model("vit")
    images = make_images(model, n=6)
    a, b = model.adaptive(images, [0.3, 0.3]), model.adaptive(images.numpy(), [0.3, 0.3])
    np.testing.assert_array_equal(a.exit_index, b.exit_index)
    np.testing.assert_array_equal(a.logits, b.logits)


# ---- the shipped Fashion-MNIST DVT --------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion():
    model = dvt_core.build("dvt_fashion_mnist", weights="default").eval()
    sub = np.load(SUBSET)
    spec = model.spec
    x = torch.from_numpy(dvt_core.data.sources.normalize(sub["images"], spec.mean, spec.std))
    return model, sub["images"], x, sub["labels"].astype(np.int64)


def test_shipped_fashion_mnist_reproduces_release_numbers(fashion, monkeypatch):
    model, images, x, y = fashion
    meta = model.checkpoint_meta
    thresholds = meta["thresholds"]
    stored = meta["subset_adaptive"]
    # the release records the exit MACs the code counts (reuse resize as gathers and weighted sums)
    costs = meta["exit_macs"]
    assert list(costs) == list(exit_macs(model.spec))

    result, ref, full_calls, calls = run_both(model, x, thresholds, monkeypatch)
    n = len(y)
    assert (result.exit_counts > 0).all(), "the default thresholds use every exit on the subset"
    assert_matches(result, ref, model.spec.num_exits)
    check_no_work_on_finished(full_calls, calls, x, ref["exit"], model)

    # what the release tool computed: policy.evaluate on all-exit probabilities
    probs = evaluation.exit_probs(model, images)
    acc_policy, macs_policy = policy.evaluate(probs, y, np.float32(thresholds), costs)
    assert acc_policy == pytest.approx(stored["accuracy"], abs=1e-9)
    assert macs_policy == pytest.approx(stored["mean_macs"], rel=1e-12)

    hits = int((result.prediction == y).sum())
    accuracy = hits * 100.0 / n
    ambiguous = int(ref["ambiguous"].sum())
    if ambiguous == 0:
        assert accuracy == pytest.approx(stored["accuracy"], abs=1e-9)
        assert np.asarray(costs)[result.exit_index].mean() == pytest.approx(stored["mean_macs"], rel=1e-12)
    else:  # an image on the fence may go either way; each moves the figures by at most its share
        assert abs(accuracy - stored["accuracy"]) <= ambiguous * 100.0 / n + 1e-9
        assert abs(np.asarray(costs)[result.exit_index].mean() - stored["mean_macs"]) <= ambiguous * (costs[-1] - costs[0]) / n + 1e-6
