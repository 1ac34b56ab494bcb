"""The weights this project ships: they load in both backends, give the accuracy their metadata states
on the shipped test subset, and torch and MindSpore agree on the whole Fashion-MNIST test set."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import dvt_core
from dvt_core.data import sources as data
from dvt_core.runtime import evaluation
from dvt_core.runtime import policy
from dvt_core.checkpoint.registry import shipped_models

SUBSET = Path(dvt_core.__file__).resolve().parent / "assets" / "fashion_mnist_test_subset.npz"
SHIPPED = ["dvt_fashion_mnist", "static_fashion_mnist_2x2", "static_fashion_mnist_4x4", "static_fashion_mnist_7x7"]


def subset():
    d = np.load(SUBSET)
    return d["images"], d["labels"]


def test_registry_lists_every_shipped_model():
    assert shipped_models() == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_torch_reproduces_the_subset_accuracy_in_the_metadata(name):
    model = dvt_core.build(name, weights="default")
    meta = model.checkpoint_meta
    x, y = subset()
    assert meta["subset"]["images"] == len(y)
    acc = policy.anytime_accuracy(evaluation.exit_probs(model, x), y)
    np.testing.assert_allclose(acc, meta["subset"]["anytime_accuracy"], atol=1e-9,
                               err_msg=f"{name}: per-exit subset accuracy differs from its metadata")
    # recorded before the reuse resize became gathers: equal without reuse, lower with it
    now, recorded = dvt_core.exit_macs(name), meta["exit_macs"]
    assert now[0] == recorded[0] and all(n <= r for n, r in zip(now, recorded))


@pytest.mark.mindspore
@pytest.mark.parametrize("name", SHIPPED)
def test_mindspore_reproduces_the_subset_accuracy_in_the_metadata(name):
    pytest.importorskip("mindspore")
    model = dvt_core.build(name, backend="mindspore", weights="default")
    x, y = subset()
    acc = policy.anytime_accuracy(evaluation.exit_probs(model, x), y)
    np.testing.assert_allclose(acc, model.checkpoint_meta["subset"]["anytime_accuracy"], atol=1e-9,
                               err_msg=f"{name} (MindSpore): subset accuracy differs from the metadata")


@pytest.mark.mindspore
def test_mindspore_adaptive_reproduces_the_default_operating_point_on_the_subset():
    pytest.importorskip("mindspore")
    model = dvt_core.build("dvt_fashion_mnist", backend="mindspore", weights="default")
    meta = model.checkpoint_meta
    x, y = subset()
    res = evaluation.adaptive(model, x, meta["thresholds"])
    assert 100.0 * float((res.prediction == y).mean()) == pytest.approx(meta["subset_adaptive"]["accuracy"], abs=1e-9)
    recorded = np.asarray(meta["exit_macs"])[res.exit_index].mean()  # costs as the release counted them
    assert recorded == pytest.approx(meta["subset_adaptive"]["mean_macs"], rel=1e-12)


def test_dvt_meets_the_static_baseline_at_half_its_cost():
    """The claim the shipped DVT is calibrated for, measured on the shipped test images: at its default
    operating point it spends at most half the MACs of the full-grid static baseline, and is at least
    as accurate."""
    x, y = subset()
    dvt = dvt_core.build("dvt_fashion_mnist", weights="default")
    static = dvt_core.build("static_fashion_mnist_7x7", weights="default")
    res = evaluation.adaptive(dvt, x, dvt.checkpoint_meta["thresholds"])
    static_acc = policy.anytime_accuracy(evaluation.exit_probs(static, x), y)[-1]
    static_macs = dvt_core.exit_macs("static_fashion_mnist_7x7")[-1]
    assert res.mean_macs <= static_macs / 2, f"{res.mean_macs:.3g} MACs vs the static model's {static_macs:.3g}"
    assert 100.0 * float((res.prediction == y).mean()) >= static_acc


def test_corrupted_default_weights_are_refused(tmp_path, monkeypatch):
    wdir = Path(dvt_core.checkpoint.registry.weights_dir())
    shutil.copy(wdir / "registry.yaml", tmp_path / "registry.yaml")
    blob = bytearray((wdir / "static_fashion_mnist_2x2.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "static_fashion_mnist_2x2.safetensors").write_bytes(bytes(blob))
    monkeypatch.setenv("DVT_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(dvt_core.CheckpointError, match="SHA-256"):
        dvt_core.build("static_fashion_mnist_2x2", weights="default")


def test_default_weights_for_a_model_without_them():
    with pytest.raises(dvt_core.CheckpointError, match="no default weights ship for 'dvt_t2t_vit_12'"):
        dvt_core.build("dvt_t2t_vit_12", weights="default")


@pytest.mark.slow
@pytest.mark.mindspore
@pytest.mark.parity
@pytest.mark.dataset
def test_torch_and_mindspore_agree_on_the_whole_test_set():
    pytest.importorskip("mindspore")
    try:
        x, y = data.load_fashion_mnist("test")
    except data.DataError as exc:
        pytest.skip(str(exc))
    spec = dvt_core.get_spec("dvt_fashion_mnist")
    from dvt_backends.mindspore import RUNTIME as ms_backend
    from dvt_backends.torch import RUNTIME as torch_backend

    pt = dvt_core.build("dvt_fashion_mnist", weights="default")
    ms = dvt_core.build("dvt_fashion_mnist", backend="mindspore", weights="default")
    worst = np.zeros(spec.num_exits)
    disagree = np.zeros(spec.num_exits, dtype=int)
    for s in range(0, len(x), 1000):
        xb = data.normalize(x[s:s + 1000], spec.mean, spec.std)
        a, b = torch_backend.forward_numpy(pt, xb), ms_backend.forward_numpy(ms, xb)
        for k in range(spec.num_exits):
            worst[k] = max(worst[k], float(np.abs(a[k] - b[k]).max()))
            disagree[k] += int((a[k].argmax(1) != b[k].argmax(1)).sum())
    assert worst.max() <= 1e-4, f"worst |torch - MindSpore| logit difference per exit: {worst.tolist()}"
    assert disagree.sum() == 0, f"predictions differ on {disagree.tolist()} images per exit"


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_each_backend_moves_a_model_to_a_device_or_names_the_bad_one(backend):
    if backend == "mindspore":
        pytest.importorskip("mindspore")
    from dvt_core.runtime.builder import get_backend

    mod = get_backend(backend)
    model = dvt_core.build("static_fashion_mnist_2x2", backend=backend, weights="default")
    assert mod.to_device(model, "cpu") is not None
    with pytest.raises(dvt_core.InputError, match="tpu"):
        mod.to_device(model, "tpu")
