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
    meta = read_checkpoint(out / f"{folder.name}.safetensors").meta
    assert meta["spec"]["num_classes"] == 3
    assert meta["classes"] == ["a", "b", "c"] and "class_names" not in meta
    n = sum(1 for _ in folder.rglob("*.png"))
    assert meta["holdout"] == round(0.1 * n) and meta["train"]["holdout"] == round(0.1 * n)  # the default 0.1
    # where it was trained and what was held out, for evaluate / calibrate to default to
    assert meta["dataset"] == {"name": folder.name, "path": str(folder.resolve()), "split": "train", "images": n,
                               "holdout": round(0.1 * n), "seed": 0}
    # calibrated on the held-out part at the end: predict needs no thresholds
    assert len(meta["thresholds"]) == 3 and meta["calibration"]["split"] == "holdout"
    assert meta["calibration"]["images"] == meta["holdout"]
    pred = ok(dvt("predict", "--weights", out / f"{folder.name}.safetensors", folder / "a"))
    assert "the default stored in" in pred.stderr

    again = refused(dvt(*BASE, "--dataset", folder, "--out", out), "already holds", "--force")
    assert str(out) in again
    ok(dvt(*BASE, "--dataset", folder, "--out", out, "--force", "--holdout", "0.25"))
    assert read_checkpoint(out / f"{folder.name}.safetensors").meta["holdout"] == round(0.25 * n)

    # calibrate of the folder-trained model: its held-out part only, its class count
    cal = ok(dvt("calibrate", "--weights", out / f"{folder.name}.safetensors", "--dataset", folder,
                 "--budget", "1e6", "--json", "-", "--force"))
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
    assert not (out / f"{folder.name}.safetensors").exists()
    assert not (out / "last.pth").exists()


def test_resume_after_max_steps_continues_inside_the_epoch(folder, tmp_path):
    whole = ok(dvt(*BASE, "--dataset", folder, "--out", tmp_path / "whole"))
    part = tmp_path / "part"
    ok(dvt(*BASE, "--dataset", folder, "--out", part, "--max-steps", "3"))  # stops after epoch 2's first step
    res = ok(dvt(*BASE, "--dataset", folder, "--out", part, "--resume"))
    assert "at epoch 2, step 3" in res.stdout, res.stdout
    a = read_checkpoint(tmp_path / "whole" / f"{folder.name}.safetensors")
    b = read_checkpoint(part / f"{folder.name}.safetensors")
    for k in a.state:
        np.testing.assert_array_equal(a.state[k], b.state[k], err_msg=k)
    assert [h["loss"] for h in a.meta["history"]] == [h["loss"] for h in b.meta["history"]]
    assert "resumed" not in whole.stdout


def test_init_reinitialises_heads_and_refuses_another_architecture(folder, tmp_path):
    src = tmp_path / "src"
    ok(dvt(*BASE, "--dataset", folder, "--out", src, "--epochs", "1"))
    src_file = src / f"{folder.name}.safetensors"
    out = tmp_path / "tuned"
    proc = ok(dvt(*BASE, "--dataset", folder, "--out", out, "--epochs", "1",
                  "--init", src_file, "-O", "num_classes=3", "-O", "grids=[2,4,14]"))
    assert "resampled stages.2.pos_embed" in proc.stdout and "resampled stages.2.tokenizer.proj.weight" in proc.stdout
    meta = read_checkpoint(out / f"{folder.name}.safetensors").meta
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
    ckpt = read_checkpoint(out / f"{folder.name}.ckpt")
    assert ckpt.format == "mindspore" and ckpt.meta["backend"] == "mindspore"
    assert ckpt.meta["classes"] == ["a", "b", "c"] and len(ckpt.meta["thresholds"]) == 3
    assert (out / "last.ckpt").exists()


def test_epoch_lines_name_each_exit_and_the_run_ends_with_the_operating_point(folder, tmp_path):
    proc = ok(dvt(*BASE, "--dataset", folder, "--out", tmp_path / "run"))
    epochs = [l for l in proc.stdout.splitlines() if l.startswith("epoch ")]
    assert len(epochs) == 2, proc.stdout
    for line in epochs:
        assert " s); held-out accuracy: exit 1 (2x2) " in line and ", exit 3 (7x7) " in line and line.endswith("%")
    meta = read_checkpoint(tmp_path / "run" / f"{folder.name}.safetensors").meta
    assert all(h["epoch_seconds"] >= 0 for h in meta["history"])
    last = proc.stdout.strip().splitlines()[-1]
    op = meta["default_operating_point"]
    assert last.startswith("calibrated operating point: ") and f"{op['holdout_accuracy']:.2f} %" in last
    assert f"{op['holdout_macs'] / 1e6:.3f}M MACs" in last
    helptext = ok(dvt("train", "--help")).stdout
    for default in ("(default 30)", "(default 256)", "(default 0.001)", "default runs/train"):
        assert default in " ".join(helptext.split()), default


@pytest.mark.hostile
def test_names_never_become_paths(folder, tmp_path):
    out = tmp_path / "inside" / "out"
    refused(dvt(*BASE, "--dataset", folder, "--out", out, "--epochs", "1", "-O", "name=../../../spec_escape"),
            "spec name", "not a plain name")  # a spec field that looks like a path is refused outright
    assert not any(tmp_path.rglob("*"))
    ok(dvt(*BASE, "--dataset", folder, "--out", out, "--epochs", "1", "--name", "../../escaped/x y"))
    assert sorted(p.name for p in out.iterdir()) == ["escaped_x_y.safetensors", "last.pth"]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["escaped_x_y.safetensors", "last.pth"]
    assert read_checkpoint(out / "escaped_x_y.safetensors").meta["name"] == "escaped_x_y"


def test_rgb_folder_trains_with_its_own_normalisation(tmp_path):
    from PIL import Image

    from dvt_core.data.sources import split_holdout

    rng = np.random.default_rng(4)
    root = tmp_path / "My Colours!"
    pixels = []
    for i in range(24):
        c = i % 2
        img = rng.integers(0, 120, (28, 28, 3)).astype(np.uint8)
        img[..., c] += 100  # class c: a brighter channel c
        (root / "rg"[c]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "RGB").save(root / "rg"[c] / f"{i:02d}.png")
    for sub in ("g", "r"):  # in the order the folder is read: sorted classes, sorted files
        pixels += [np.asarray(Image.open(p)) for p in sorted((root / sub).glob("*.png"))]
    proc = ok(dvt(*BASE, "--dataset", root, "--out", tmp_path / "run", "-O", "in_chans=3", "--holdout", "4",
                  "--epochs", "1"))
    assert "normalisation from the 20 training images" in proc.stdout
    meta = read_checkpoint(tmp_path / "run" / "My_Colours.safetensors").meta
    train_idx, _ = split_holdout(24, 4, 0)
    train = np.stack(pixels)[train_idx].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(meta["spec"]["mean"], train.mean(0), atol=1e-6)
    np.testing.assert_allclose(meta["spec"]["std"], train.std(0), atol=1e-6)
    assert meta["normalisation"] == {"mean": meta["spec"]["mean"], "std": meta["spec"]["std"],
                                     "from": "training images"}
    assert meta["dataset"]["name"] == "My Colours!" and meta["name"] == "My_Colours"


def test_init_default_starts_from_the_shipped_weights(folder, tmp_path):
    from dvt_core.checkpoint.registry import default_weights_path

    out = tmp_path / "tuned"
    proc = ok(dvt("train", "--model", "dvt_fashion_mnist", "--dataset", folder, "--out", out, "--init", "default",
                  "--epochs", "1", "--max-steps", "1", "--batch-size", "16", "--no-progress"))
    shipped = str(default_weights_path("dvt_fashion_mnist"))
    assert f"--init {shipped}:" in proc.stdout
    meta = read_checkpoint(out / f"{folder.name}.safetensors").meta
    assert meta["init"]["file"] == shipped
    assert sorted(meta["init"]["reinitialised"]) == [f"stages.{i}.head.{p} (10 -> 3 classes)"
                                                     for i in range(3) for p in ("bias", "weight")]


def test_library_checks_are_the_commands(folder, tmp_path):
    """A Python caller of train_dataset meets the checks `dvt train` reports."""
    import dvt_core
    from dvt_core.errors import ConfigError, InputError
    from dvt_core.training.config import TrainConfig
    from dvt_core.training.runs import train_dataset

    spec = dvt_core.get_spec("dvt_fashion_mnist", **TINY)
    with pytest.raises(ConfigError, match="^lr must be a finite number above 0, got nan"):
        train_dataset(folder, spec, TrainConfig(lr=float("nan"), batch_size=16), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="batch size 256 is larger than the 32 training images"):
        train_dataset(folder, spec, TrainConfig(holdout=4), tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="3 classes.*num_classes=5"):
        train_dataset(folder, dvt_core.get_spec(spec, num_classes=5), TrainConfig(batch_size=16), tmp_path / "a",
                      fixed_classes=True, progress=False)
    assert not (tmp_path / "a").exists()
    refused(dvt(*BASE, "--dataset", folder, "--out", tmp_path / "b", "--lr", "nan"), "--lr", "finite", "nan")
    refused(dvt(*BASE, "--dataset", folder, "--out", tmp_path / "b", "--weight-decay", "-1"), "--weight-decay")
    refused(dvt(*BASE, "--dataset", folder, "--out", tmp_path / "b", "--seed", "-1"), "--seed", "[0, 4294967295]")
