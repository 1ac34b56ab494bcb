"""`dvt train` from the command line, in fresh processes: folders of another class count, fractional
hold-out, calibration at the end, --force, divergence, --resume inside an epoch, --init, MindSpore.

Tiny models (one block per stage, width 16) on a synthetic image folder (tests/test_train.py's
learnable squares) keep each run to seconds.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from dvt_core.checkpoint.files import read_checkpoint

from helpers import TINY, _write_image_folder, dvt, synthetic

OV = [a for k, v in TINY.items() for a in ("-O", f"{k}={v}")]
BASE = ["train", "--model", "dvt_fashion_mnist", *OV, "--epochs", "2", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """36 images of 3 classes (sub-folders a, b, c): 32 trained on, 4 held out, 2 steps an epoch at batch 16."""
    images, labels = synthetic(120, seed=2)
    keep = labels < 3
    root = tmp_path_factory.mktemp("three")
    _write_image_folder(root, images[keep], labels[keep])
    for c in range(3):
        (root / f"class{c}").rename(root / "abc"[c])
    return root


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def refused(proc, *words):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_folder_classes_holdout_calibration_and_force(folder, tmp_path):
    out = tmp_path / "run"
    proc = ok(dvt(*BASE, "--dataset", folder, "--out", out))
    assert "has 3 classes: training dvt_fashion_mnist with num_classes=3" in proc.stdout
    meta = read_checkpoint(out / "dvt_fashion_mnist.safetensors").meta
    assert meta["spec"]["num_classes"] == 3
    assert meta["classes"] == ["a", "b", "c"] and "class_names" not in meta
    n = sum(1 for _ in folder.rglob("*.png"))
    assert meta["holdout"] == round(0.1 * n) and meta["train"]["holdout"] == round(0.1 * n)  # the default 0.1
    # calibrated on the held-out part at the end: predict needs no thresholds
    assert len(meta["thresholds"]) == 3 and meta["calibration"]["split"] == "holdout"
    assert meta["calibration"]["images"] == meta["holdout"]
    pred = ok(dvt("predict", "--weights", out / "dvt_fashion_mnist.safetensors", folder / "a"))
    assert "the default stored in" in pred.stderr

    again = refused(dvt(*BASE, "--dataset", folder, "--out", out), "already holds", "--force")
    assert str(out) in again
    ok(dvt(*BASE, "--dataset", folder, "--out", out, "--force", "--holdout", "0.25"))
    assert read_checkpoint(out / "dvt_fashion_mnist.safetensors").meta["holdout"] == round(0.25 * n)

    # calibrate of the folder-trained model: its held-out part only, its class count
    cal = ok(dvt("calibrate", "--weights", out / "dvt_fashion_mnist.safetensors", "--dataset", folder,
                 "--budget", "1e6", "--json", "-"))
    result = json.loads(cal.stdout)
    assert result["split"] == "holdout" and result["images"] == round(0.25 * n)

    refused(dvt(*BASE, "--dataset", folder, "--out", tmp_path / "x", "-O", "num_classes=5"), "3 classes",
            "num_classes=5")
    refused(dvt(*BASE, "--dataset", folder, "--out", tmp_path / "x", "--holdout", "1.5"), "--holdout")


def test_divergence_stops_with_status_2_and_writes_no_weights(folder, tmp_path):
    out = tmp_path / "nan"
    line = refused(dvt(*BASE, "--dataset", folder, "--out", out, "--lr", "1e30", "--warmup-epochs", "0"),
                   "diverged", "step")
    assert "at step " in line and "(epoch 1)" in line
    assert not (out / "dvt_fashion_mnist.safetensors").exists()
    assert not (out / "last.pth").exists()


def test_resume_after_max_steps_continues_inside_the_epoch(folder, tmp_path):
    whole = ok(dvt(*BASE, "--dataset", folder, "--out", tmp_path / "whole"))
    part = tmp_path / "part"
    ok(dvt(*BASE, "--dataset", folder, "--out", part, "--max-steps", "3"))  # stops after epoch 2's first step
    res = ok(dvt(*BASE, "--dataset", folder, "--out", part, "--resume"))
    assert "at epoch 2, step 3" in res.stdout, res.stdout
    a = read_checkpoint(tmp_path / "whole" / "dvt_fashion_mnist.safetensors")
    b = read_checkpoint(part / "dvt_fashion_mnist.safetensors")
    for k in a.state:
        np.testing.assert_array_equal(a.state[k], b.state[k], err_msg=k)
    assert [h["loss"] for h in a.meta["history"]] == [h["loss"] for h in b.meta["history"]]
    assert "resumed" not in whole.stdout


def test_init_reinitialises_heads_and_refuses_another_architecture(folder, tmp_path):
    src = tmp_path / "src"
    ok(dvt(*BASE, "--dataset", folder, "--out", src, "--epochs", "1"))
    src_file = src / "dvt_fashion_mnist.safetensors"
    out = tmp_path / "tuned"
    proc = ok(dvt(*BASE, "--dataset", folder, "--out", out, "--epochs", "1",
                  "--init", src_file, "-O", "num_classes=3", "-O", "grids=[2,4,14]"))
    assert "resampled stages.2.pos_embed" in proc.stdout and "resampled stages.2.tokenizer.proj.weight" in proc.stdout
    meta = read_checkpoint(out / "dvt_fashion_mnist.safetensors").meta
    assert meta["init"]["file"] == str(src_file) and len(meta["init"]["resampled"]) == 2
    line = refused(dvt(*BASE, "--dataset", folder, "--out", tmp_path / "bad", "--init", src_file,
                       "-O", "embed_dim=24"), "does not fit", "mismatched")
    assert "qkv" in line
    refused(dvt(*BASE, "--dataset", folder, "--out", tmp_path / "bad", "--init", tmp_path / "nope.pth"),
            "--init file not found")


@pytest.mark.mindspore
def test_mindspore_training_from_the_command_line(folder, tmp_path):
    pytest.importorskip("mindspore", reason="MindSpore training needs mindspore")
    out = tmp_path / "ms"
    ok(dvt(*BASE, "--dataset", folder, "--out", out, "--backend", "mindspore", "--epochs", "1", timeout=600))
    ckpt = read_checkpoint(out / "dvt_fashion_mnist.ckpt")
    assert ckpt.format == "mindspore" and ckpt.meta["backend"] == "mindspore"
    assert ckpt.meta["classes"] == ["a", "b", "c"] and len(ckpt.meta["thresholds"]) == 3
    assert (out / "last.ckpt").exists()
