"""Exported graphs against the framework that exported them: ONNX Runtime and OpenVINO vs torch, MindIR vs
MindSpore.

Per-exit logits within 1e-4; adaptive exits identical for every image whose confidence is not within
1e-5 of a threshold. Small overrides for every zoo model; full size with the official fixture weights
(slow); the exported Fashion-MNIST DVT reproduces the accuracy in its metadata on the shipped subset.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import dvt_core
from dvt_core.runtime import policy
from dvt_core.export.writer import export_model

from official import (conformance_dir, exit_differences, official_keys, official_state_from_shapes,
                      write_official_release)
from .conftest import random_images, record_worst, small_overrides

pytestmark = [pytest.mark.parity, pytest.mark.export]
ATOL = 1e-4
NEAR = 1e-5
ROOT = Path(__file__).resolve().parents[2]
SUBSET = ROOT / "dvt_core" / "assets" / "fashion_mnist_test_subset.npz"
MODELS = [n for n in dvt_core.list_models() if not n.startswith("static_")]
# MindIR export compiles every stage in graph mode (15-30 s per small model on 2 cores). Shrunk to the
# small overrides, several zoo models have the same graph but for the name and the MLP width
# (dvt_t2t_vit_7/10/12/14/19/24, ...): OpenVINO and MindIR run one model per distinct small graph, MindIR
# DeiT in the quick suite, the other families with the slow tests.
MINDIR_QUICK = ("dvt_deit_small",)


def _small_graph_groups() -> list[list[str]]:
    """Zoo models whose small specs are the same but for the name and the MLP width (``mlp_ratio``): the
    same graph, one weight shape apart."""
    groups: dict[str, list[str]] = {}
    for name in MODELS:
        d = dvt_core.get_spec(name, **small_overrides(name)).to_dict()
        d.pop("name")
        d["stages"] = [{k: v for k, v in st.items() if k != "mlp_ratio"} for st in d["stages"]]
        groups.setdefault(repr(d), []).append(name)
    return [sorted(g, key=lambda n: (n not in MINDIR_QUICK, n)) for g in groups.values()]


# The T2T models with MLP ratio 3 (dvt_t2t_vit_14/19/24) have the graph of those with ratio 2
# (dvt_t2t_vit_7/10/12) with wider weights (DeiT's ratio 4 is another width checked). MindIR leaves out the
# group of dvt_fashion_mnist: test_mindir_fashion_mnist_accuracy runs the same checks on the shipped
# dvt_fashion_mnist (its family, one input channel, reuse sizes; the padded patch embedding of the small
# grids is the DeiT group's), so MindSpore compiles that cascade once, not twice.
GRAPH_GROUPS = _small_graph_groups()
MINDIR_GRAPH_GROUPS = [g for g in GRAPH_GROUPS if "dvt_fashion_mnist" not in g]


def median_thresholds(logits) -> list:
    """Each exit's median confidence: half the images leave at every exit."""
    return [float(np.median(policy.softmax(np.asarray(lg)).max(1))) for lg in logits[:-1]] + [-1e8]


def assert_same_exits(ours, ref, ref_logits, thresholds) -> None:
    """Identical exits, except for images whose confidence at some exit is within NEAR of its threshold."""
    conf = np.stack([policy.softmax(np.asarray(lg)).max(1) for lg in ref_logits[:-1]])  # (exits-1, B)
    near = (np.abs(conf - np.asarray(thresholds[:-1], np.float32)[:, None]) <= NEAR).any(0)
    differ = ours.exit_index != ref.exit_index
    assert not (differ & ~near).any(), f"exits differ: {ours.exit_index} vs {ref.exit_index}"
    assert len(set(ref.exit_index.tolist())) > 1, "the thresholds should split the images over exits"
    np.testing.assert_array_equal(ours.macs[~near], ref.macs[~near])


def check_onnx(model, out_dir: Path, images: np.ndarray, label: str):
    import torch

    export_model(model, "onnx", out_dir)
    rt = dvt_core.build(out_dir, backend="onnx")
    with torch.no_grad():
        ref = [o.numpy() for o in model(torch.from_numpy(images))]
    ours = rt(images)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(ours, ref)]
    record_worst(f"onnx {label}", diffs)
    assert max(diffs) <= ATOL, f"{label}: ONNX Runtime vs torch per exit {diffs}"
    t = median_thresholds(ref)
    assert_same_exits(rt.adaptive(images, t), model.adaptive(torch.from_numpy(images), t), ref, t)
    return rt


def check_openvino(model, out_dir: Path, images: np.ndarray, label: str, resize: str = "auto"):
    """OpenVINO fp32 on the ONNX export (``resize`` form) against torch: logits within ATOL, same exits."""
    import torch

    export_model(model, "onnx", out_dir, resize=resize)
    rt = dvt_core.build(out_dir, backend="openvino")
    with torch.no_grad():
        ref = [o.numpy() for o in model(torch.from_numpy(images))]
    ours = rt(images)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(ours, ref)]
    record_worst(f"openvino {label}", diffs)
    assert max(diffs) <= ATOL, f"{label}: OpenVINO vs torch per exit {diffs}"
    t = median_thresholds(ref)
    assert_same_exits(rt.adaptive(images, t), model.adaptive(torch.from_numpy(images), t), ref, t)
    return rt


def check_mindir(model, out_dir: Path, images: np.ndarray, label: str):
    export_model(model, "mindir", out_dir)
    return compare_mindir(dvt_core.build(out_dir, backend="mindir"), model, images, label)


def compare_mindir(rt, model, images: np.ndarray, label: str):
    """The MindIR runtime ``rt`` against the MindSpore ``model`` it was exported from: logits within ATOL,
    same exits."""
    from dvt_backends.mindspore import RUNTIME

    adaptive_numpy, forward_numpy = RUNTIME.adaptive_numpy, RUNTIME.forward_numpy

    ref = forward_numpy(model, images)
    ours = rt(images)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(ours, ref)]
    record_worst(f"mindir {label}", diffs)
    assert max(diffs) <= ATOL, f"{label}: MindIR vs MindSpore per exit {diffs}"
    t = median_thresholds(ref)
    assert_same_exits(rt.adaptive(images, t), adaptive_numpy(model, images, t), ref, t)
    return rt


# ---- ONNX Runtime vs torch ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_onnx_zoo_small(name, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    model = dvt_core.build(name, backend="torch", **small_overrides(name)).eval()
    check_onnx(model, tmp_path / "e", random_images(model.spec, 16), f"{name} (small)")


@pytest.mark.slow
@pytest.mark.conformance
@pytest.mark.parametrize("name", ["dvt_t2t_vit_12", "dvt_deit_small"])
def test_onnx_full_size_official_weights(name, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    data = np.load(conformance_dir() / f"official_{name}.npz")
    path = write_official_release(tmp_path / f"{name}.pth.tar", official_state_from_shapes(official_keys(name)))
    model = dvt_core.build(name, backend="torch", weights=path).eval()
    images = np.concatenate([data["images"], random_images(model.spec, 4, seed=3)])
    rt = check_onnx(model, tmp_path / "e", images, f"{name} (official weights)")
    ours = rt(data["images"])
    for a, b in zip(ours, data["logits"]):  # and the official release's own logits
        assert float(np.abs(a - b).max()) <= ATOL


def _subset():
    with np.load(SUBSET) as d:
        return d["images"], d["labels"].astype(np.int64)


def check_fashion_accuracy(rt) -> None:
    """The export reproduces the accuracy the shipped weights' metadata gives for the shipped subset."""
    from dvt_core.runtime import evaluation

    images, labels = _subset()
    meta = rt.checkpoint_meta
    probs = evaluation.exit_probs(rt, images)
    anytime = [round(100.0 * float((p.argmax(1) == labels).mean()), 2) for p in probs]
    assert anytime == pytest.approx(meta["subset"]["anytime_accuracy"], abs=0.01)
    res = evaluation.adaptive(rt, images, rt.manifest["thresholds"])
    assert round(100.0 * float((res.prediction == labels).mean()), 2) == pytest.approx(
        meta["subset_adaptive"]["accuracy"], abs=0.01)
    assert float(res.macs.mean()) == pytest.approx(meta["subset_adaptive"]["mean_macs"], rel=1e-9)


@pytest.fixture(scope="module")
def fashion_onnx(tmp_path_factory):
    """``export`` of the shipped dvt_fashion_mnist to ONNX, made once for ONNX Runtime and OpenVINO."""
    pytest.importorskip("torch")
    from dvt_core.export.writer import export

    return export("dvt_fashion_mnist", weights="default", fmt="onnx", out=tmp_path_factory.mktemp("fm") / "fm")


def test_onnx_fashion_mnist_accuracy(fashion_onnx):
    pytest.importorskip("onnxruntime")
    rt = dvt_core.build(fashion_onnx, backend="onnx")
    assert rt.manifest["thresholds"] == rt.checkpoint_meta["thresholds"]
    assert len(rt.manifest["budgets"]) == 59
    check_fashion_accuracy(rt)


# ---- OpenVINO vs torch: one model per distinct small graph (the graphs of the others are the same, an MLP
# width apart at most), both resize forms ------------------------------------------------------------------


@pytest.mark.parametrize("resize", ["gather", "dense"])
@pytest.mark.parametrize("name", [g[0] for g in GRAPH_GROUPS])
def test_openvino_zoo_small(name, resize, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("torch")
    model = dvt_core.build(name, backend="torch", **small_overrides(name)).eval()
    check_openvino(model, tmp_path / "e", random_images(model.spec, 16), f"{name} (small, {resize})", resize)


def test_openvino_fashion_mnist_accuracy(fashion_onnx):
    pytest.importorskip("openvino")
    rt = dvt_core.build(fashion_onnx, backend="openvino")
    check_fashion_accuracy(rt)


# ---- MindIR vs MindSpore ----------------------------------------------------------------------------------


@pytest.mark.mindspore
@pytest.mark.parametrize("group", [pytest.param(g, id="=".join(g), marks=() if g[0] in MINDIR_QUICK else pytest.mark.slow)
                                   for g in MINDIR_GRAPH_GROUPS])
def test_mindir_zoo_small(group, tmp_path):
    pytest.importorskip("mindspore")
    name = group[0]
    model = dvt_core.build(name, backend="mindspore", **small_overrides(name))
    check_mindir(model, tmp_path / "e", random_images(model.spec, 16), f"{name} (small)")


@pytest.mark.slow
@pytest.mark.mindspore
@pytest.mark.conformance
def test_mindir_full_size_official_weights(tmp_path):
    """MindSpore builds the official DVT-T2T-ViT-12 release straight from its layout and reproduces its
    logits (the whole cascade called as a cell); its MindIR export then matches it.

    MindIR at full size (224 px, 7/10/14 grids, 12 blocks a stage, the release's reuse sizes) once: the
    export compiles every stage's graph, about a minute a model on 2 cores. DVT-DeiT-S adds no graph of
    its own: its MindIR graphs are those of the small DeiT group of test_mindir_zoo_small (padded patch
    embedding, qkv bias, MLP ratio 4) at other sizes, and its full-size official weights are checked in
    ONNX Runtime against torch and the release's logits (test_onnx_full_size_official_weights) and in
    MindSpore (test_parity.py: test_official_release_reproduced, test_full_size)."""
    ms = pytest.importorskip("mindspore")
    pytest.importorskip("torch")
    name = "dvt_t2t_vit_12"
    data = np.load(conformance_dir() / f"official_{name}.npz")
    path = write_official_release(tmp_path / f"{name}.pth.tar", official_state_from_shapes(official_keys(name)))
    model = dvt_core.build(name, backend="mindspore", weights=path)
    model.set_train(False)
    assert model.checkpoint_meta["flops"] == pytest.approx([0.5, 1.4, 3.4])
    diffs = exit_differences([o.asnumpy() for o in model(ms.Tensor(data["images"]))], data["logits"])
    record_worst(f"official {name}", diffs)
    assert max(diffs) <= ATOL, f"{name}: MindSpore vs the official logits, per exit {diffs}"
    images = np.concatenate([data["images"], random_images(model.spec, 4, seed=3)])
    check_mindir(model, tmp_path / "e", images, f"{name} (official weights)")


@pytest.mark.slow
@pytest.mark.mindspore
def test_mindir_fashion_mnist_accuracy(tmp_path):
    pytest.importorskip("mindspore")
    from dvt_core.export.writer import export

    rt = dvt_core.build(export("dvt_fashion_mnist", weights="default", fmt="mindir", out=tmp_path / "fm"),
                        backend="mindir")
    check_fashion_accuracy(rt)
    model = dvt_core.build("dvt_fashion_mnist", backend="mindspore", weights="default")
    compare_mindir(rt, model, random_images(model.spec, 16), "dvt_fashion_mnist (shipped weights)")
