"""A practitioner's own images: class folders named their way, a model trained on a folder evaluated and
calibrated on it, unreadable files, the Python API's result fields, budgets and thresholds as typed,
predict's options, export and calibrate of an export folder, the lean install (no matplotlib, no
framework) and torch.hub's declared dependencies.

Every folder is made here from real Fashion-MNIST test images (the 1,000 shipped in dvt_core/assets),
written as PNG, plus hand-made broken files.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import CLASSES, ROOT, SHIPPED, SUBSET, ok as succeeded, run_dvt, user_error as refused

# How a person names the folders: sorted, these would number the classes unlike the model does.
FOLDER_NAMES = ["tshirt", "TROUSER", "pull over", "Dress", "coat", "sandal", "shirt", "Sneaker", "bag", "ankle_boot"]
EXIT1_MACS = 1053056  # dvt_fashion_mnist's first exit (dvt flops dvt_fashion_mnist)


def _subset():
    with np.load(SUBSET) as d:
        return d["images"], d["labels"].astype(np.int64)


def write_folder(root: Path, names: dict, per_class: int, offset: int = 0) -> Path:
    """``root/<name>/<i>.png`` for each ``{class index: folder name}``: ``per_class`` real test images."""
    from PIL import Image

    images, labels = _subset()
    for c, name in names.items():
        (root / name).mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(labels == c)[offset:offset + per_class]):
            Image.fromarray(images[i]).save(root / name / f"{j:03d}.png")
    return root


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    base = tmp_path_factory.mktemp("own")
    folders = {"forgiving": write_folder(base / "forgiving", dict(enumerate(FOLDER_NAMES)), 8),
               "unmatched": write_folder(base / "unmatched", {9: "ankle_boot", 0: "socks"}, 2)}
    broken = write_folder(base / "broken", {1: "trouser", 8: "bag"}, 5)
    (broken / "trouser" / "zz_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (broken / "bag" / "not_an_image.jpg").write_text("hello")
    folders["broken"] = broken
    images, labels = _subset()
    from PIL import Image

    singles = base / "singles"
    singles.mkdir()
    for c in (1, 8, 9):
        Image.fromarray(images[int(np.flatnonzero(labels == c)[50])]).save(singles / f"class{c}.png")
    folders["singles"] = singles
    return folders


@pytest.fixture(autouse=True)
def _scratch_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# ---- class folders named the user's way ------------------------------------------------------------------

def test_folder_classes_matched_forgivingly(own):
    proc = succeeded(run_dvt("evaluate", "--model", "dvt_fashion_mnist", "--weights", "default", "--dataset",
                             own["forgiving"], "--calibration", "same", "--baselines", "none", "--json", "-"))
    res = json.loads(proc.stdout)
    assert res["classes"] == CLASSES and res["images"] == 80
    # In sorted folder order (ankle_boot, bag, coat, ...) six of ten classes would be numbered wrong.
    assert res["anytime_accuracy"][-1] >= 75, res["anytime_accuracy"]


def test_unmatched_class_folder_is_refused_by_name(own):
    line = refused(run_dvt("evaluate", "--model", "dvt_fashion_mnist", "--dataset", own["unmatched"],
                           "--baselines", "none"), "'socks'", "Ankle boot", "T-shirt/top")
    assert "ankle_boot" not in line.split("match none")[0]


def test_old_class_names_key_is_read():
    from dvt_core.data.datasets import model_classes

    assert model_classes({"class_names": ["a", "b"]}, 2) == ["a", "b"]
    assert model_classes({"classes": ["x", "y"], "class_names": ["a", "b"]}, 2) == ["x", "y"]


# ---- unreadable files: all of them, in one pass ----------------------------------------------------------

def test_every_unreadable_file_is_named_at_once(own):
    from dvt_core.data.sources import UnreadableImagesError, load_image_folder

    with pytest.raises(UnreadableImagesError) as err:
        load_image_folder(own["broken"], img_size=28, unreadable="raise")
    assert len(err.value.problems) == 2
    assert "zz_truncated.png" in str(err.value) and "not_an_image.jpg" in str(err.value)
    skipped = []
    x, y, names = load_image_folder(own["broken"], img_size=28, unreadable="skip", skipped=skipped)
    assert len(x) == 10 and len(skipped) == 2 and names == ["bag", "trouser"]


def test_evaluate_skips_unreadable_files_with_a_summary(own):
    proc = succeeded(run_dvt("evaluate", "--model", "dvt_fashion_mnist", "--dataset", own["broken"],
                             "--calibration", "same", "--baselines", "none", "--json", "-"))
    assert json.loads(proc.stdout)["images"] == 10
    assert "skipped 2 unreadable image file(s)" in proc.stderr
    assert "zz_truncated.png" in proc.stderr and "not_an_image.jpg" in proc.stderr


# ---- a model trained on a folder: evaluated and calibrated on it --------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-block DVT trained for two steps on a 3-class folder given by a relative path."""
    base = tmp_path_factory.mktemp("trained")
    write_folder(base / "data", {1: "Trouser", 7: "Sneaker", 8: "Bag"}, 20)
    succeeded(run_dvt("train", "--model", "dvt_fashion_mnist", "-O", "depth=1", "--dataset", "data", "--out", "run",
                      "--epochs", "1", "--max-steps", "2", "--batch-size", "16", "--holdout", "0.25",
                      "--no-progress", cwd=base, timeout=600))
    test = write_folder(base / "test", {1: "trouser", 7: "sneaker", 8: "BAG"}, 6, offset=40)
    return {"ckpt": base / "run" / "data.safetensors", "data": base / "data", "test": test}


def test_checkpoint_records_its_training_folder(trained):
    from dvt_core.checkpoint.files import read_checkpoint

    meta = read_checkpoint(trained["ckpt"]).meta
    record = meta["dataset"]
    assert record["path"] == str(trained["data"].resolve()) and record["name"] == "data"
    assert meta["classes"] == ["Bag", "Sneaker", "Trouser"]
    assert record["holdout"] == 15 and record["images"] == 60 and meta["holdout"] == 15


def test_evaluate_a_folder_trained_model_on_a_test_folder(trained, tmp_path):
    proc = succeeded(run_dvt("evaluate", "--weights", trained["ckpt"], "--dataset", trained["test"], "--json", "-",
                             "--plot", tmp_path / "curve.png"))
    res = json.loads(proc.stdout)
    assert res["images"] == 18 and res["classes"] == ["Bag", "Sneaker", "Trouser"]
    assert res["calibration"]["images"] == 15 and str(trained["data"].resolve()) in res["calibration"]["data"]
    op = res["default_operating_point"]
    assert res["exit_macs"][0] <= op["macs"] <= res["exit_macs"][-1] and 0 <= op["accuracy"] <= 100
    assert "default thresholds" in proc.stderr and (tmp_path / "curve.png").stat().st_size > 1000


def test_evaluate_without_dataset_uses_the_held_out_part(trained):
    proc = succeeded(run_dvt("evaluate", "--weights", trained["ckpt"], "--json", "-"))
    res = json.loads(proc.stdout)
    assert res["images"] == 15 and res["split"] == "holdout" and "optimistic" in proc.stderr


def test_calibrate_without_dataset_uses_the_training_folder_held_out_part(trained, tmp_path):
    ck = tmp_path / "cal.safetensors"  # run from another folder than training: the path is absolute
    proc = succeeded(run_dvt("calibrate", "--weights", trained["ckpt"], "--out", ck, "--budget", "1e9",
                             "--json", "-"))
    res = json.loads(proc.stdout)
    assert res["split"] == "holdout" and res["images"] == 15 and res["dataset"] == str(trained["data"].resolve())
    assert "fashion-mnist" not in proc.stderr.lower()


def test_calibrate_refuses_a_training_folder_that_changed(trained, tmp_path):
    moved = tmp_path / "data"
    shutil.copytree(trained["data"], moved)
    (moved / "Bag" / "000.png").unlink()
    from dvt_core.checkpoint.files import read_checkpoint, write_checkpoint

    ckpt = read_checkpoint(trained["ckpt"])
    ck = tmp_path / "moved.safetensors"
    write_checkpoint(ck, ckpt.state, {**ckpt.meta, "dataset": str(moved)})
    refused(run_dvt("calibrate", "--weights", ck, "--budget", "1e9", "--force"), "59 readable images", "not the 60")


# ---- the Python API's result --------------------------------------------------------------------------------

@pytest.mark.parametrize("streaming", [True, False])
def test_adaptive_result_exit_is_one_based_and_carries_every_exit_confidence(streaming):
    import dvt_core
    from dvt_core.runtime import evaluation

    model = dvt_core.build("dvt_fashion_mnist", weights="default")
    images, _ = _subset()
    t = np.float32(model.checkpoint_meta["thresholds"])
    res = evaluation.adaptive(model, images[:64], t, batch_size=16, streaming=streaming)
    np.testing.assert_array_equal(res.exit, res.exit_index + 1)
    assert set(res.exit.tolist()) <= {1, 2, 3} and res.to_dict()["exit"] == res.exit.tolist()
    conf = res.exit_confidences
    assert conf.shape == (64, 3)
    for i in range(64):
        k = int(res.exit_index[i])
        assert conf[i, k] == pytest.approx(float(res.confidence[i]), abs=1e-6)
        assert np.isnan(conf[i, k + 1:]).all() and (conf[i, :k] < t[:k]).all()


# ---- budgets and thresholds as a user types them ------------------------------------------------------------

def test_budget_as_printed_is_accepted(own):
    proc = succeeded(run_dvt("predict", own["singles"], "--model", "dvt_fashion_mnist", "--budget", "1.05M",
                             "--json"))
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["exit"] for r in rows} == {1} and {r["macs"] for r in rows} == {EXIT1_MACS}
    refused(run_dvt("predict", own["singles"], "--model", "dvt_fashion_mnist", "--budget", "1.04M"), "cheapest")


def test_thresholds_count_and_nan_are_refused_in_the_users_words(own):
    refused(run_dvt("predict", own["singles"], "--model", "dvt_fashion_mnist", "--thresholds", "0.9,0.9,0.9"),
            "gives 3 value(s)", "takes 2")
    line = refused(run_dvt("predict", own["singles"], "--model", "dvt_fashion_mnist", "--thresholds", "nan,0.5"),
                   "'nan'")
    assert "1e8" not in line and "100000000" not in line


# ---- predict ------------------------------------------------------------------------------------------------

def test_predict_top_k_exit_confidences_and_summary(own):
    proc = succeeded(run_dvt("predict", own["singles"], "--model", "dvt_fashion_mnist", "--json", "--top-k", "3"))
    rows = [json.loads(line) for line in proc.stdout.splitlines()]  # JSON Lines: one object per line
    assert len(rows) == 3
    for r in rows:
        probs = [t["probability"] for t in r["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert r["top_k"][0]["prediction"] == r["prediction"]
        assert len(r["exit_confidences"]) == 3 and r["exit_confidences"][r["exit"] - 1] == r["confidence"]
        assert all(c is None for c in r["exit_confidences"][r["exit"]:])
    assert "3 image(s) in" in proc.stderr and "MACs per image on average" in proc.stderr


def test_predict_paths_from_stdin_and_a_list_in_batches(own, tmp_path):
    files = sorted(str(p) for p in own["singles"].iterdir())
    whole = succeeded(run_dvt("predict", *files, "--model", "dvt_fashion_mnist", "--json"))
    piped = succeeded(run_dvt("predict", "-", "--model", "dvt_fashion_mnist", "--json", "--batch-size", "1",
                              "--threads", "1", stdin="\n".join(files) + "\n"))
    (tmp_path / "list.txt").write_text("\n".join(files) + "\n\n")
    listed = succeeded(run_dvt("predict", "--files-from", tmp_path / "list.txt", "--model", "dvt_fashion_mnist",
                               "--json", "--batch-size", "2"))
    key = lambda p: [(r["path"], r["prediction"], r["exit"]) for r in map(json.loads, p.stdout.splitlines())]
    assert key(whole) == key(piped) == key(listed) and len(key(whole)) == 3
    refused(run_dvt("predict", "--model", "dvt_fashion_mnist"), "--files-from")


def test_help_shows_defaults():
    for command, shown in (("evaluate", "(default: 500)"), ("predict", "(default: 64)"),
                           ("calibrate", "(default: torch)"), ("demo", "(default: dvt_demo.png)")):
        text = " ".join(succeeded(run_dvt(command, "--help")).stdout.split())
        assert shown in text, (command, text)


def test_flops_list_marks_shipped_weights():
    lines = succeeded(run_dvt("flops", "--list")).stdout.splitlines()
    by_name = {line.split()[0]: line for line in lines}
    assert "shipped" in by_name["dvt_fashion_mnist"] and "shipped" not in by_name["dvt_deit_small"]


# ---- export and calibrate an export folder -------------------------------------------------------------------

@pytest.mark.export
def test_export_modes_name_from_weights_and_calibrate_in_place(own, tmp_path):
    pytest.importorskip("onnx")
    old = os.umask(0o022)
    try:
        succeeded(run_dvt("export", "--weights", SHIPPED, "--format", "onnx", "--out", tmp_path / "fm"))
    finally:
        os.umask(old)
    out = tmp_path / "fm"
    assert out.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())
    manifest = json.loads((out / "dvt.json").read_text())
    graphs = {st["file"]: (out / st["file"]).read_bytes() for st in manifest["stages"]}
    proc = succeeded(run_dvt("calibrate", "--weights", out, "--budget", "2.5M", "--dataset", own["forgiving"],
                             "--json", "-"))
    res = json.loads(proc.stdout)
    after = json.loads((out / "dvt.json").read_text())
    assert after["thresholds"] == res["thresholds"] != manifest["thresholds"]
    assert after["stages"] == manifest["stages"]  # graphs and their SHA-256 kept
    assert all((out / f).read_bytes() == b for f, b in graphs.items())
    assert after["checkpoint_meta"]["calibration"]["dataset"] == str(own["forgiving"].resolve())
    pred = succeeded(run_dvt("predict", own["singles"], "--backend", "onnx", "--weights", out))
    shown = ", ".join(f"{t:.4f}" for t in res["thresholds"][:-1])
    assert f"thresholds {shown}" in pred.stderr


# ---- the lean install ---------------------------------------------------------------------------------------

def test_setup_extras():
    import setuptools

    captured = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        cwd = os.getcwd()
        os.chdir(ROOT)
        exec(compile((ROOT / "setup.py").read_text(), "setup.py", "exec"), {"__name__": "__main__"})
    finally:
        setuptools.setup = real
        os.chdir(cwd)
    extras = captured["extras_require"]
    assert sorted(p.split("=")[0] for p in extras["onnxruntime"]) == ["numpy", "onnxruntime"]
    assert not any(p.startswith("matplotlib") for p in captured["install_requires"])
    assert any(p.startswith("matplotlib") for p in extras["plots"])
    assert "plots" in (ROOT / "Makefile").read_text().split("pip install --quiet -e")[1].splitlines()[0]


def test_core_runs_without_matplotlib_and_says_so_for_a_picture(own):
    img = next(own["singles"].iterdir())
    succeeded(run_dvt("predict", img, "--model", "dvt_fashion_mnist", block={"matplotlib"}))
    refused(run_dvt("evaluate", "--model", "dvt_fashion_mnist", "--dataset", own["forgiving"], "--plot", "c.png",
                    block={"matplotlib"}), "matplotlib", "dvt[plots]")
    demo = succeeded(run_dvt("demo", block={"matplotlib"}))
    assert "matplotlib is not installed" in demo.stderr and not Path("dvt_demo.png").exists()


def test_torch_hub_declares_what_it_imports(tmp_path):
    """Everything the hub entry imports beyond torch's own imports is in hubconf.dependencies."""
    code = f"""
import sys, torch
before = set(sys.modules)
model = torch.hub.load({str(ROOT)!r}, "dvt_fashion_mnist", source="local", pretrained=True)
import ast
tree = ast.parse(open({str(ROOT / "hubconf.py")!r}).read())
declared = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
            and any(getattr(t, "id", "") == "dependencies" for t in n.targets)][0]
new = {{m.split(".")[0] for m in set(sys.modules) - before}} - set(sys.stdlib_module_names)
new -= {{"hubconf", "dvt_core", "dvt_backends", "dvt_weights"}}
new = {{n for n in new if not n.startswith("_")}}  # runtime modules of compiled extensions
missing = sorted(n for n in new if n not in declared)
print("missing", missing)
"""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "missing []", proc.stdout
