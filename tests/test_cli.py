"""The ``dvt`` command line, run as a user runs it: ``dvt_core.cli.main`` with its output captured (what
``python -m dvt_core ...`` runs; a fresh process only where the process is what is checked: the ``dvt``
script, a user error's exit status).

Success paths check what each subcommand writes (text, JSON, PNG, checkpoints); user errors must exit
with status 2 and exactly one line on stderr, never a traceback. Tests that need the Fashion-MNIST
data set are skipped where it is not installed; the demo and everything else run on the 1,000 test
images shipped in dvt_core/assets and on small image folders made here.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import CLASSES, SHIPPED, SUBSET, assert_png, assert_same_tensors, dvt, needs_fashion, needs_mindspore, ok, read_state, user_error


@pytest.fixture(autouse=True)
def _run_elsewhere(tmp_path, monkeypatch):
    """Commands run in a scratch folder, so nothing they (or a framework) write lands in the repository."""
    monkeypatch.chdir(tmp_path)


# ---- shared inputs -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Image files (grey PNG, RGB JPEG of another size, a broken PNG), an empty folder and a two-class
    image folder whose sub-folders are named like the model's classes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cli")
    with np.load(SUBSET) as d:
        images, labels = d["images"], d["labels"]
    imgs = root / "images"
    imgs.mkdir()
    truth = {}
    for c in (0, 1, 7):
        i = int(np.flatnonzero(labels == c)[0])
        Image.fromarray(images[i]).save(imgs / f"test{i}.png")
        truth[imgs / f"test{i}.png"] = c
    rgb = np.stack([images[int(np.flatnonzero(labels == 8)[0])]] * 3, axis=-1)
    Image.fromarray(rgb).resize((56, 56)).save(imgs / "bag_rgb.jpg")
    (root / "empty").mkdir()
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    folder = root / "folder"
    for c, name in ((1, "Trouser"), (7, "sneaker")):
        (folder / name).mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(labels == c)[:6]):
            Image.fromarray(images[i]).save(folder / name / f"{j}.png")
    return {"root": root, "images": imgs, "n_images": 4, "truth": truth, "empty": root / "empty", "broken": root / "broken.png",
            "folder": folder}


# ---- demo ----------------------------------------------------------------------------------------------

def test_demo_console_script(tmp_path):
    proc = ok(dvt("demo", "--out", tmp_path / "demo.png", "--json", tmp_path / "demo.json", "--limit", "5",
                  script=True, cwd=tmp_path))
    out = proc.stdout
    assert "dvt demo --full" in out  # says how to run on the whole test set
    assert re.search(r"accuracy: \d+\.\d+% \(\d+/48\)", out)
    assert "static_fashion_mnist_7x7" in out and "11.80M" in out
    assert "exits taken:" in out and "43 more images" in out
    table = [ln for ln in out.splitlines() if re.match(r"\s*\d+\s+\S", ln) and "exit " in ln]
    assert len(table) == 5
    assert_png(tmp_path / "demo.png")
    res = json.loads((tmp_path / "demo.json").read_text())
    assert res["model"] == "dvt_fashion_mnist" and res["images"] == 48 and len(res["per_image"]) == 48
    assert sum(res["exit_counts"]) == 48 and abs(sum(res["exit_shares"]) - 1) < 1e-9
    assert res["static_macs"] == 11801216 and 0 < res["macs_ratio"] < 1
    assert all(p["prediction"] in CLASSES and p["label"] in CLASSES and 1 <= p["exit"] <= 3 for p in res["per_image"])
    assert res["accuracy"] == pytest.approx(100 * np.mean([p["prediction"] == p["label"] for p in res["per_image"]]))
    assert res["mean_macs"] == pytest.approx(np.mean([p["macs"] for p in res["per_image"]]))


# ---- predict -------------------------------------------------------------------------------------------

def test_predict_folder_and_file(files):
    broken_free = [files["images"], next(iter(files["truth"]))]
    proc = ok(dvt("predict", *broken_free, "--model", "dvt_fashion_mnist"))
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == files["n_images"] + 1
    # One line per image, folders expanded in sorted order; the easy garments are recognised.
    expected = {"bag_rgb.jpg": "Bag", **{p.name: CLASSES[c] for p, c in files["truth"].items()}}
    for ln in lines:
        name = Path(ln.split()[0]).name
        assert expected[name] in ln, ln
    for ln in lines:
        assert re.search(r"exit [123]/3 \((2x2|4x4|7x7) tokens\)", ln), ln
        assert re.search(r"\d+\.\d\d?M MACs$", ln), ln
        assert any(c in ln for c in CLASSES)
    assert "default stored in the shipped weights" in proc.stderr


def test_predict_json_budget_and_thresholds(files):
    proc = ok(dvt("predict", files["images"], "--model", "dvt_fashion_mnist", "--json", "--budget", "1.2e6"))
    rows = [json.loads(ln) for ln in proc.stdout.strip().splitlines()]
    assert len(rows) == files["n_images"]
    # 1.2M MACs is below every stored budget but above exit 1: every image leaves at exit 1.
    assert {r["exit"] for r in rows} == {1} and {r["macs"] for r in rows} == {1053056}
    assert {"path", "prediction", "class_index", "confidence", "exit", "exits", "grid", "macs"} <= set(rows[0])
    assert all(r["prediction"] in CLASSES and r["exits"] == 3 and r["grid"] == 2 for r in rows)
    proc = ok(dvt("predict", next(iter(files["truth"])), "--weights", SHIPPED, "--json",
                  "--thresholds", "2,2"))  # confidences never reach 2: everything runs to the last exit
    row = json.loads(proc.stdout)
    assert row["exit"] == 3 and row["grid"] == 7 and row["macs"] == 19236216


@needs_mindspore
def test_predict_mindspore_matches_torch(files):
    a = ok(dvt("predict", files["images"], "--model", "dvt_fashion_mnist", "--json"))
    b = ok(dvt("predict", files["images"], "--model", "dvt_fashion_mnist", "--json", "--backend", "mindspore"))
    ra = [json.loads(ln) for ln in a.stdout.splitlines()]
    rb = [json.loads(ln) for ln in b.stdout.splitlines()]
    assert [(r["prediction"], r["exit"]) for r in ra] == [(r["prediction"], r["exit"]) for r in rb]
    np.testing.assert_allclose([r["confidence"] for r in ra], [r["confidence"] for r in rb], atol=1e-3)


# ---- evaluate ------------------------------------------------------------------------------------------

@needs_fashion
def test_evaluate_fashion_mnist(tmp_path):
    proc = ok(dvt("evaluate", "--model", "dvt_fashion_mnist", "--weights", "default", "--dataset", "fashion-mnist",
                  "--split", "test", "--limit", "100", "--calibration-limit", "500",
                  "--json", tmp_path / "eval.json", "--plot", tmp_path / "eval.png"))
    res = json.loads((tmp_path / "eval.json").read_text())
    assert {"model", "backend", "dataset", "split", "images", "exit_macs", "anytime_accuracy", "budgets",
            "static_baselines"} <= set(res)
    assert res["model"] == "dvt_fashion_mnist" and res["backend"] == "torch" and res["images"] == 100
    assert res["split"] == "test" and res["exit_macs"] == [1053056, 5127568, 19236216]
    assert len(res["anytime_accuracy"]) == 3 and all(0 <= a <= 100 for a in res["anytime_accuracy"])
    assert [b["budget"] for b in res["budgets"]] == list(range(1, 60))
    for b in res["budgets"]:
        assert set(b) >= {"budget", "macs", "accuracy", "thresholds"} and len(b["thresholds"]) == 3
        assert res["exit_macs"][0] <= b["macs"] <= res["exit_macs"][-1] and 0 <= b["accuracy"] <= 100
    assert res["calibration"]["images"] == 500
    assert [s["model"] for s in res["static_baselines"]] == [
        "static_fashion_mnist_2x2", "static_fashion_mnist_4x4", "static_fashion_mnist_7x7"]
    assert res["static_baselines"][-1]["macs"] == 11801216
    assert_png(tmp_path / "eval.png")
    assert "budgeted early exit: 59 budgets" in proc.stdout and "static baselines:" in proc.stdout


def test_evaluate_image_folder_same_calibration(files, tmp_path):
    proc = ok(dvt("evaluate", "--model", "dvt_fashion_mnist", "--dataset", files["folder"], "--calibration", "same",
                  "--baselines", "none", "--json", "-"))
    res = json.loads(proc.stdout)
    assert res["images"] == 12 and res["static_baselines"] == [] and len(res["budgets"]) == 59
    # The sub-folders are named like the checkpoint's classes, so its numbering is used: trousers and
    # sneakers are easy, the full-grid exit should get nearly all of them.
    assert res["classes"] == CLASSES and res["anytime_accuracy"][-1] >= 75
    assert res["calibration"]["data"] == "evaluated images"


# ---- calibrate -----------------------------------------------------------------------------------------

def _meta(path: Path) -> dict:
    from dvt_core.checkpoint.files import read_checkpoint

    return read_checkpoint(path).meta


@needs_fashion
def test_calibrate_shipped_to_out(tmp_path):
    out = tmp_path / "cal.safetensors"
    proc = ok(dvt("calibrate", "--model", "dvt_fashion_mnist", "--weights", "default", "--budget", "2.5e6",
                  "--out", out, "--limit", "400", "--json", tmp_path / "cal.json"))
    assert f"wrote {out}" in proc.stdout
    meta, shipped = _meta(out), _meta(SHIPPED)
    assert meta["calibration"]["holdout_macs"] <= 2.5e6 and meta["calibration"]["images"] == 400
    assert meta["thresholds"] != shipped["thresholds"] and len(meta["thresholds"]) == 3
    assert meta["budgets"] == shipped["budgets"] and meta["classes"] == CLASSES  # the rest is kept
    assert_same_tensors(read_state(out), read_state(SHIPPED))
    res = json.loads((tmp_path / "cal.json").read_text())
    assert res["thresholds"] == meta["thresholds"] and res["target_macs"] == 2.5e6


def test_calibrate_in_place_on_image_folder(files, tmp_path):
    ck = tmp_path / "mine.safetensors"
    shutil.copy(SHIPPED, ck)
    proc = ok(dvt("calibrate", "--weights", ck, "--budget", "3e6", "--dataset", files["folder"], "--force"))
    assert "thresholds" in proc.stdout and f"wrote {ck}" in proc.stdout
    meta = _meta(ck)
    assert meta["calibration"]["dataset"] == str(files["folder"]) and meta["calibration"]["holdout_macs"] <= 3e6
    assert_same_tensors(read_state(ck), read_state(SHIPPED))
    # predict picks the stored thresholds up as the default
    proc = ok(dvt("predict", next(iter(files["truth"])), "--weights", ck))
    spelled = {-1e8: "-1e8 (all leave)", 1e8: "1e8 (none leave)"}  # sentinels are named, numbers get 4 decimals
    stored = ", ".join(spelled.get(t, f"{t:.4f}") for t in meta["thresholds"][:-1])
    assert f"thresholds {stored} (the default stored in {ck})" in proc.stderr


# ---- convert -------------------------------------------------------------------------------------------

@needs_mindspore
def test_convert_round_trip(tmp_path):
    """safetensors -> MindSpore .ckpt -> torch .pth: every tensor and the metadata survive."""
    ok(dvt("convert", SHIPPED, tmp_path / "a.ckpt"))
    proc = ok(dvt("convert", tmp_path / "a.ckpt", tmp_path / "b.pth"))
    assert "320 tensors" in proc.stdout and "dvt_fashion_mnist" in proc.stdout
    assert_same_tensors(read_state(tmp_path / "b.pth"), read_state(SHIPPED))
    assert _meta(tmp_path / "b.pth")["thresholds"] == _meta(SHIPPED)["thresholds"]


def _to_official(state: dict) -> dict:
    """Canonical names -> the official release's (the inverse of dvt_core.checkpoint.naming for this ViT cascade)."""
    prefixes = ("less_less_token", "less_token", "normal_token")
    rules = ((r"^tokenizer\.proj\.", "patch_embed.proj."), (r"\.feature_reuse\.norm\.", ".feature_resuse_mlp.0."),
             (r"\.feature_reuse\.fc([12])\.", r".feature_resuse_mlp.1.fc\1."),
             (r"^relation_reuse\.expand\.", "relation_reuse_conv.0."),
             (r"^relation_reuse\.reduce\.", "relation_reuse_conv.2."))
    out = {}
    for k, v in state.items():
        _, i, rest = k.split(".", 2)
        for pat, repl in rules:
            rest = re.sub(pat, repl, rest)
        out[f"{prefixes[int(i)]}.{rest}"] = v
    return out


def test_convert_official_release(tmp_path):
    from official import write_official_release

    from dvt_core.checkpoint.naming import rename_official

    shipped = read_state(SHIPPED)
    official = _to_official(shipped)
    assert rename_official(official, 3).keys() == shipped.keys()
    src = write_official_release(tmp_path / "release.pth.tar", official)
    user_error(dvt("convert", src, tmp_path / "x.safetensors"), "--arch")
    proc = ok(dvt("convert", src, tmp_path / "x.safetensors", "--arch", "dvt_fashion_mnist"))
    assert "arch dvt_fashion_mnist" in proc.stdout
    assert_same_tensors(read_state(tmp_path / "x.safetensors"), shipped)
    meta = _meta(tmp_path / "x.safetensors")
    assert meta["converted_from"] == "official" and "flops" in meta["official"]


# ---- train ---------------------------------------------------------------------------------------------

@needs_fashion
def test_train_and_resume_fashion_mnist(tmp_path):
    args = ["train", "--model", "dvt_fashion_mnist", "-O", "depth=1", "--out", tmp_path / "run", "--holdout", "100",
            "--batch-size", "32", "--no-progress"]
    proc = ok(dvt(*args, "--epochs", "1", "--max-steps", "2"))
    final = tmp_path / "run" / "dvt_fashion_mnist.safetensors"
    assert (tmp_path / "run" / "last.pth").is_file() and final.is_file()
    assert "epoch 1/1" in proc.stdout
    meta = _meta(final)
    assert meta["holdout"] == 100 and meta["spec"]["stages"][0]["depth"] == 1 and len(meta["history"]) == 1
    proc = ok(dvt(*args, "--epochs", "2", "--max-steps", "4", "--resume"))
    # stopped inside epoch 1 by --max-steps: the resume continues that epoch at step 2
    assert "resumed from" in proc.stdout and "at epoch 1, step 2" in proc.stdout and "epoch 1/2" in proc.stdout
    assert len(_meta(final)["history"]) == 1


def test_train_image_folder_then_predict(files, tmp_path):
    out = tmp_path / "run"
    ok(dvt("train", "--model", "dvt_fashion_mnist", "-O", "depth=1", "-O", "num_classes=2", "--dataset",
           files["folder"], "--out", out, "--epochs", "1", "--max-steps", "1", "--holdout", "4", "--batch-size", "4",
           "--no-progress"))
    ck = out / "folder.safetensors"  # a folder-trained model is named after its folder
    # training ends calibrated on its 4 held-out images: predict works at once
    assert _meta(ck)["classes"] == ["Trouser", "sneaker"] and len(_meta(ck)["thresholds"]) == 3
    img = next(iter(files["truth"]))
    ok(dvt("predict", img, "--weights", ck))
    # calibrate of the folder-trained model uses the same held-out part, never the trained-on images
    ok(dvt("calibrate", "--weights", ck, "--dataset", files["folder"], "--budget", "1e9", "--force"))
    meta = _meta(ck)
    assert len(meta["budgets"]) == 59 and len(meta["thresholds"]) == 3 and meta["calibration"]["images"] == 4
    assert meta["calibration"]["split"] == "holdout"
    proc = ok(dvt("predict", img, "--weights", ck, "--budget", "1e9", "--json"))
    assert json.loads(proc.stdout)["prediction"] in ("Trouser", "sneaker")


# ---- flops ---------------------------------------------------------------------------------------------

def test_flops():
    proc = ok(dvt("flops", "dvt_fashion_mnist"))
    assert "3 exit(s)" in proc.stdout and "19.236M" in proc.stdout
    rows = json.loads(ok(dvt("flops", "dvt_fashion_mnist", "--json")).stdout)
    assert [r["exit_macs"] for r in rows] == [1053056, 5127568, 19236216]
    assert "static_fashion_mnist_7x7" in ok(dvt("flops", "--list")).stdout.split()


# ---- user errors: status 2, one line ----------------------------------------------------------------------

def _error_cases(f, tmp):
    img = next(iter(f["truth"]))
    return [
        (["predict", tmp / "nope.png", "--model", "dvt_fashion_mnist"], ["nope.png"]),
        (["predict", f["empty"], "--model", "dvt_fashion_mnist"], ["no image files"]),
        (["predict", img, "--model", "dvt_nope"], ["unknown model 'dvt_nope'"]),
        (["predict", img, "--model", "dvt_fashion_mnist", "--backend", "jax"], ["unknown backend 'jax'"]),
        (["predict", img, "--model", "dvt_fashion_mnist", "--budget", "1000"], ["cheapest", "1053056"]),
        (["predict", img, "--model", "dvt_deit_tiny", "--weights", "default"], ["no default weights", "dvt_deit_tiny"]),
        (["predict", img, "--model", "static_fashion_mnist_7x7", "--weights", SHIPPED],
         ["dvt_fashion_mnist", "not static_fashion_mnist_7x7"]),
        (["predict", img, "--model", "dvt_fashion_mnist", "--weights", tmp / "missing.safetensors"], ["not found"]),
        (["predict", img, "--model", "dvt_fashion_mnist", "--thresholds", "0.5"], ["--thresholds"]),
        (["predict", img, "--model", "dvt_fashion_mnist", "--device", "cuda:7"], ["cuda"]),
        (["predict"], ["image files", "--files-from"]),  # no inputs at all
        (["calibrate", "--model", "dvt_fashion_mnist", "--weights", "default", "--budget", "4e6"],
         ["refusing", "--out"]),
        (["calibrate", "--weights", tmp / "copy.safetensors", "--budget", "5e5", "--force"], ["cheapest", "1053056"]),
        (["calibrate", "--weights", tmp / "copy.safetensors", "--budget", "4e6"], ["in place", "--out", "--force"]),
        (["calibrate", "--weights", tmp / "copy.safetensors", "--budget", "4e6", "--out", tmp / "exists.pth"],
         ["exists", "--force"]),
        (["evaluate", "--model", "dvt_fashion_mnist", "--dataset", f["folder"], "--split", "test"], ["no test split"]),
        (["evaluate", "--model", "dvt_fashion_mnist", "--dataset", tmp / "nowhere"], ["unknown dataset"]),
        (["evaluate", "--model", "dvt_fashion_mnist", "--limit", "0"], ["--limit"]),
        (["convert", SHIPPED, tmp / "exists.pth"], ["exists", "--force"]),
        (["convert", SHIPPED, tmp / "out.txt"], ["--to"]),
        (["train", "--model", "dvt_fashion_mnist", "--dataset", f["folder"], "--out", tmp / "r"], ["--batch-size"]),
        (["flops", "nope"], ["unknown model"]),
        (["demo", "--backend", "jax"], ["unknown backend"]),
    ]


def test_user_errors(files, tmp_path):
    shutil.copy(SHIPPED, tmp_path / "copy.safetensors")
    (tmp_path / "exists.pth").write_bytes(b"keep me")
    failures = []
    for k, (args, fragments) in enumerate(_error_cases(files, tmp_path)):
        proc = dvt(*args, cwd=tmp_path, process=k == 0)  # the first as a process exits: status 2 at its end
        try:
            user_error(proc, *fragments)
        except AssertionError as exc:
            failures.append(f"dvt {' '.join(map(str, args))}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert (tmp_path / "exists.pth").read_bytes() == b"keep me"
    assert_same_tensors(read_state(tmp_path / "copy.safetensors"), read_state(SHIPPED))
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
