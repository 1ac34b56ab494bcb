"""Mistakes a newcomer makes with the ``dvt`` command line, through ``dvt_core.cli.main`` with its output
captured (test_cli.py and test_newcomer.py check status 2 and the single line at a real process's exit).

Each gets status 2 and one line on stderr naming the problem, or the right behaviour. Fast: `dvt flops`,
the shipped tiny Fashion-MNIST model, a few image files made here; nothing trains.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from helpers import SHIPPED, SUBSET, dvt, needs_mindspore, ok, user_error

MODEL = ["--model", "dvt_fashion_mnist"]


@pytest.fixture(autouse=True)
def _run_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of test images in nested sub-folders, plus a file that is not an image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("errors")
    with np.load(SUBSET) as d:
        imgs = d["images"][:3]
    tree = root / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / ".hidden").mkdir()
    Image.fromarray(imgs[0]).save(tree / "top.png")
    Image.fromarray(imgs[1]).save(tree / "a" / "mid.png")
    Image.fromarray(np.stack([imgs[2]] * 3, -1)).save(tree / "a" / "b" / "deep.jpg")
    Image.fromarray(imgs[0]).save(tree / ".hidden" / "skip.png")
    (tree / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    one = root / "one.png"
    Image.fromarray(imgs[0]).save(one)
    # A two-class folder named like the model's classes (for `evaluate --calibration same`).
    folder = root / "folder"
    for c, name in ((0, "Trouser"), (1, "Bag")):
        (folder / name).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(imgs[(c + j) % 3]).save(folder / name / f"{j}.png")
    return {"root": root, "tree": tree, "one": one, "folder": folder}


# ---- spec overrides -----------------------------------------------------------------------------------

@pytest.mark.parametrize("override,fragments", [
    ("depth=abc", ["depth", "'abc'", "whole number"]),
    ("depth=1.5", ["depth", "1.5", "whole number"]),
    ("mlp_ratio=-2", ["mlp_ratio", "-2", "> 0"]),
    ("feature_reuse_dim=-4", ["feature_reuse_dim", "-4", ">= 1"]),
    ("ln_eps=-1", ["ln_eps", "-1", "> 0"]),
    ("std=0", ["std", "0", "> 0"]),
    ("relation_reuse=maybe", ["relation_reuse", "'maybe'", "true or false"]),
    ("token_dim=abc", ["token_dim", "'abc'", "whole number"]),
    ("grids=2,x,7", ["grids", "2,x,7", "comma-separated"]),
    ("num_classes=0", ["num_classes", ">= 1"]),
    ("pos_embed=rope", ["pos_embed", "'rope'", "sinusoid"]),
])
def test_bad_override_values_are_named(override, fragments):
    user_error(dvt("flops", "dvt_fashion_mnist", "-O", override), "dvt_fashion_mnist", *fragments)


def _exit_params(*overrides) -> list:
    rows = json.loads(ok(dvt("flops", "dvt_fashion_mnist", "--json", *sum((["-O", o] for o in overrides), []))).stdout)
    return [(r["grid"], r["exit_params"]) for r in rows]


def test_override_forms_that_parse():
    # `1e3` is exactly 1000; grids as a comma list, a YAML list and a tuple all name the same model.
    assert _exit_params("num_classes=1e3") == _exit_params("num_classes=1000") != _exit_params()
    assert _exit_params("grids=2,4,7") == _exit_params("grids=[2,4,7]") == _exit_params("grids=(2, 4, 7)")
    assert [g for g, _ in _exit_params("grids=2,4,4")] == ["2x2", "4x4", "4x4"]


# ---- devices --------------------------------------------------------------------------------------------

def _device_cases(f, tmp):
    return {
        "predict": ["predict", f["one"], *MODEL],
        "demo": ["demo", "--out", tmp / "demo.png"],
        "evaluate": ["evaluate", *MODEL, "--dataset", f["folder"], "--calibration", "same"],
        "calibrate": ["calibrate", "--weights", SHIPPED, "--out", tmp / "cal.safetensors", "--budget", "5M"],
        "train": ["train", *MODEL, "--dataset", f["folder"], "--out", tmp / "run"],
    }


@pytest.mark.parametrize("command", ["predict", "demo", "evaluate", "calibrate", "train"])
def test_unknown_torch_device_in_every_subcommand(command, images, tmp_path):
    user_error(dvt(*_device_cases(images, tmp_path)[command], "--device", "banana"), "unknown torch device 'banana'")
    assert not any(tmp_path.iterdir()), "nothing is written for a refused device"


def test_cuda_without_cuda(images, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot be exercised")
    user_error(dvt(*_device_cases(images, tmp_path)["train"], "--device", "cuda"), "cuda", "no CUDA")


@pytest.mark.mindspore
@needs_mindspore
def test_mindspore_device_it_cannot_use(images, tmp_path):
    from dvt_backends.mindspore import compat

    if compat.device_available("GPU"):
        pytest.skip("this MindSpore build can use a GPU: the refusal cannot be exercised")
    user_error(dvt(*_device_cases(images, tmp_path)["predict"], "--backend", "mindspore", "--device", "gpu"),
               "GPU", "cannot use")


# ---- outputs --------------------------------------------------------------------------------------------

def test_plot_as_jpeg(images, tmp_path):
    from PIL import Image

    proc = ok(dvt("evaluate", *MODEL, "--dataset", images["folder"], "--calibration", "same",
                  "--plot", tmp_path / "curve.jpg", "--baselines", "none"))
    assert "curve.jpg" in proc.stdout
    with Image.open(tmp_path / "curve.jpg") as img:
        assert img.format == "JPEG" and img.size[0] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["curve.jpg"], "no temporary file is left behind"


def test_outputs_refused_before_the_work(images, tmp_path):
    (tmp_path / "afile").write_text("x")
    cases = [
        (["evaluate", *MODEL, "--dataset", images["folder"], "--calibration", "same", "--plot", "curve.gif"],
         ["curve.gif", ".png, .jpg"]),
        (["evaluate", *MODEL, "--dataset", images["folder"], "--calibration", "same", "--plot", "nodir/curve.png"],
         ["nodir/curve.png", "nodir", "does not exist"]),
        (["evaluate", *MODEL, "--dataset", images["folder"], "--calibration", "same", "--json", "afile/r.json"],
         ["afile/r.json", "not a folder"]),
        (["demo", "--out", "nodir/demo.png"], ["nodir/demo.png", "does not exist"]),
        (["demo", "--json", "nodir/demo.json", "--out", ""], ["nodir/demo.json", "does not exist"]),
        (["calibrate", "--weights", SHIPPED, "--out", "nodir/cal.safetensors", "--budget", "5M"],
         ["nodir/cal.safetensors", "does not exist"]),
        (["convert", SHIPPED, "nodir/x.safetensors"], ["nodir/x.safetensors", "does not exist"]),
    ]
    for args, fragments in cases:
        line = user_error(dvt(*args, cwd=tmp_path), *fragments)
        assert ".tmp" not in line, "the user's path is named, not a temporary file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"], "no folder is created, nothing is written"


# ---- thresholds and budgets -------------------------------------------------------------------------------

def test_empty_thresholds_is_an_error(images):
    user_error(dvt("predict", images["one"], *MODEL, "--thresholds", ""), "--thresholds", "empty")


def test_budget_with_a_unit(images):
    plain = ok(dvt("predict", images["one"], *MODEL, "--budget", "5000000", "--json"))
    with_unit = ok(dvt("predict", images["one"], *MODEL, "--budget", "5M"))
    assert "budget 5.00M MACs" in with_unit.stderr
    assert json.loads(plain.stdout)["prediction"] in with_unit.stdout
    user_error(dvt("predict", images["one"], *MODEL, "--budget", "5Q"), "--budget", "'5Q'")


# ---- flops and the zoo -------------------------------------------------------------------------------------

def test_flops_takes_backend_and_wildcards():
    base = ok(dvt("flops", "dvt_fashion_mnist")).stdout
    assert ok(dvt("flops", "dvt_fashion_mnist", "--backend", "mindspore")).stdout == base
    user_error(dvt("flops", "dvt_fashion_mnist", "--backend", "jax"), "unknown backend 'jax'")
    assert ok(dvt("flops", "--list", "dvt_deit*")).stdout.split() == ["dvt_deit_base", "dvt_deit_small",
                                                                         "dvt_deit_tiny"]
    user_error(dvt("flops", "--list", "resnet*"), "no model matches 'resnet*'")


def test_list_models_wildcards():
    import dvt_core

    assert dvt_core.list_models("dvt_t2t*") == [f"dvt_t2t_vit_{d}" for d in (10, 12, 14, 19, 24, 7)]
    assert dvt_core.list_models("static_*_?x?") == ["static_fashion_mnist_2x2", "static_fashion_mnist_4x4",
                                                    "static_fashion_mnist_7x7"]
    assert "dvt_ms_deit_small" in dvt_core.list_models("deit")  # no wildcard: a part of the name
    assert "dvt_ms_deit_small" not in dvt_core.list_models("dvt_deit*")
    assert dvt_core.list_models("*nothing*") == []


# ---- predict on folders ----------------------------------------------------------------------------------------

def test_predict_recurses_and_skips_unreadable_files(images):
    proc = dvt("predict", images["tree"], *MODEL)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines()]
    tree = str(images["tree"])
    assert listed == [os.path.join(tree, "a", "b", "deep.jpg"), os.path.join(tree, "a", "mid.png"),
                      os.path.join(tree, "top.png")]
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("dvt predict: skipped ")]
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    assert "1 of 4" in proc.stderr
    # Without the broken file the same folder succeeds.
    proc = ok(dvt("predict", images["tree"] / "a" / "b", images["one"], *MODEL))
    assert len(proc.stdout.splitlines()) == 2
