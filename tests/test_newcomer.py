"""What a new user meets from a fresh clone: pipes closed early, names and notes that follow the weights, a
checkpoint never rewritten without --force, a list with a missing path, evaluate reusing the thresholds it
stores, training that says why it stopped, output and --help that read as text, and the last hostile inputs
(a library warning, metadata out of range, a tensor name with terminal escapes, export graphs of another shape).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import dvt_core
from dvt_core.checkpoint.files import read_checkpoint, write_checkpoint
from dvt_core.export.manifest import sha256_of

from helpers import ROOT, SHIPPED, SMALL, TINY, _write_image_folder, dvt, needs_fashion, refused, run, synthetic

FM = "dvt_fashion_mnist"


def _png(path, size=28, value=200):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8), "L").save(path)
    return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    return [_png(root / f"{i}.png", value=40 * i + 20) for i in range(4)]


def _closed_stdout(args) -> subprocess.CompletedProcess:
    """The CLI with its stdout a pipe whose reader is gone before the first line (``| head -0``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "dvt_core", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return subprocess.CompletedProcess(args, proc.wait(timeout=120), "", err)


@pytest.mark.parametrize("command", [["flops", "--list"], ["predict", "--model", FM, "--json"]])
def test_a_pipe_closed_early_ends_quietly(command, pictures):
    args = command + ([str(p) for p in pictures] if command[0] == "predict" else [])
    proc = _closed_stdout(args)
    assert proc.returncode in (0, 141), proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def _renamed_copy(tmp_path, meta_update) -> str:
    ck = read_checkpoint(SHIPPED)
    meta = {k: v for k, v in ck.meta.items() if k not in ("name", "dataset")}
    meta.update(meta_update)
    return str(write_checkpoint(tmp_path / "mine.safetensors", ck.state, meta))


def test_predict_names_the_weights_and_their_note_not_the_architecture(tmp_path, pictures):
    mine = _renamed_copy(tmp_path, {"name": "mydata", "dataset": {"name": "mydata", "path": str(tmp_path),
                                                                   "images": 45, "holdout": 5, "seed": 0}})
    own = dvt("predict", "--weights", mine, "--top-k", "3", *pictures[:1])
    assert own.returncode == 0, own.stderr
    header = own.stderr.splitlines()[0]
    assert header.startswith("# mydata (torch)") and FM not in header, own.stderr
    assert "Fashion-MNIST" not in own.stderr and "silhouettes" not in own.stderr, own.stderr
    # --top-k in text lists all k classes, the prediction first
    line = own.stdout.splitlines()[0]
    label = line.split()[1]
    assert " top 3: " + label in line and line.split(" top 3: ")[1].count("%") == 3, line
    shipped = dvt("predict", "--model", FM, *pictures[:1])
    assert shipped.stderr.startswith(f"# {FM} (torch)") and "silhouettes" in shipped.stderr, shipped.stderr
    pytest.importorskip("onnx")
    exported = dvt("export", "--weights", mine, "--format", "onnx", "--out", tmp_path / "mine_onnx")
    assert exported.returncode == 0 and "(mydata, onnx:" in exported.stdout, exported.stdout + exported.stderr


def test_calibrate_never_rewrites_the_only_checkpoint_without_force(tmp_path):
    mine = tmp_path / "my.safetensors"
    shutil.copyfile(SHIPPED, mine)
    before = mine.read_bytes()
    refused(dvt("calibrate", "--weights", mine, "--budget", "3M"), "in place", "--out", "--force")
    assert mine.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["my.safetensors"]


def test_a_missing_listed_path_is_skipped_like_an_unreadable_image(tmp_path, pictures):
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join([str(pictures[0]), str(tmp_path / "gone.png"), str(pictures[1])]) + "\n")
    proc = dvt("predict", "--model", FM, "--files-from", listed)
    assert proc.returncode == 1, proc.stderr
    assert [ln.split()[0] for ln in proc.stdout.splitlines()] == [str(pictures[0]), str(pictures[1])]
    assert f"skipped {tmp_path / 'gone.png'}: no such file" in proc.stderr
    assert "1 of 3 image(s) could not be read" in proc.stderr
    listed.write_text(str(tmp_path / "gone.png") + "\n")
    refused(dvt("predict", "--model", FM, "--files-from", listed), "none of the 1")


@needs_fashion
def test_evaluate_reuses_the_stored_budget_table_instead_of_rescoring_the_held_out_part(monkeypatch, capsys):
    from dvt_core.cli.main import main
    from dvt_core.runtime import evaluation, policy

    scored = []
    real = evaluation.exit_probs

    def counting(model, images, *args, **kwargs):
        scored.append(len(images))
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(evaluation, "exit_probs", counting)
    assert main(["evaluate", "--model", FM, "--limit", "40", "--baselines", "none", "--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 5000 not in scored and scored[0] == 40, scored
    assert out["calibration"]["images"] == 5000 and "budgets table" in out["calibration"]["data"]
    meta = dvt_core.build(FM, weights="default").checkpoint_meta
    assert [b["thresholds"] for b in out["budgets"]] == [b["thresholds"] for b in meta["budgets"]]
    from dvt_core.data.sources import load_fashion_mnist

    images, labels = (a[:40] for a in load_fashion_mnist("test"))  # what evaluate --limit 40 scored
    probs = real(dvt_core.build(FM, weights="default"), images)
    row = out["budgets"][20]
    acc, macs = policy.evaluate(probs, labels, np.float32(row["thresholds"]), out["exit_macs"])
    assert row["accuracy"] == pytest.approx(acc) and row["macs"] == pytest.approx(macs)


def test_evaluate_prints_sentinel_thresholds_as_words():
    import io

    from dvt_core.cli.commands.evaluate import _print_evaluation

    spec = dvt_core.get_spec(FM)
    result = {"model": FM, "backend": "torch", "dataset": "d", "images": 3, "exit_macs": [1, 2, 3],
              "anytime_accuracy": [1.0, 2.0, 3.0], "default_operating_point": None, "static_baselines": [],
              "calibration": {"images": 3, "data": "x"},
              "budgets": [{"budget": 1, "macs": 3.0, "accuracy": 3.0, "thresholds": [1e8, 0.25, -1e8]}]}
    out = io.StringIO()
    _print_evaluation(result, spec, "all", out)
    assert "1e8 (none leave), 0.250" in out.getvalue() and "100000000" not in out.getvalue()


def test_training_says_max_steps_stopped_it_and_warns_of_a_tiny_held_out_part(tmp_path):
    images, labels = synthetic(60, seed=2)
    keep = labels < 3
    _write_image_folder(tmp_path / "data", images[keep], labels[keep])
    ov = [a for k, v in TINY.items() for a in ("-O", f"{k}={v}")]
    proc = dvt("train", "--model", FM, *ov, "--dataset", tmp_path / "data", "--out", tmp_path / "run",
               "--epochs", "3", "--max-steps", "1", "--batch-size", "8", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert "stopped by --max-steps 1 at step 1, in epoch 1 of 3" in text, text
    assert "calibrated on only 2 held-out images" in text, text
    assert "--init default" in text, text
    calibrated = dvt("calibrate", "--weights", tmp_path / "run" / "data.safetensors", "--budget", "1e9", "--out",
                     tmp_path / "cal.safetensors")
    assert calibrated.returncode == 0 and "# note: calibrating on only 2 images" in calibrated.stderr, calibrated.stderr


def test_training_progress_bars_stay(monkeypatch):
    import tqdm.auto

    from dvt_core.training import config as C

    seen = {}

    class Bar(list):
        def set_postfix(self, **_):
            pass

    def fake(iterable, **kwargs):
        seen.update(kwargs)
        return Bar(iterable)

    monkeypatch.setattr(tqdm.auto, "tqdm", fake)
    batches = iter([(np.zeros((2, 1)), np.zeros(2, np.int64))])
    C.run_epoch(lambda *a: 0.5, batches, C.TrainConfig(), 0, 0, 1, 1, 0, progress=True)
    assert seen["leave"] is True and seen["disable"] is False


def _help(command: str) -> str:
    from dvt_core.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    return " ".join(sub.choices[command].format_help().split())


def test_help_texts_say_what_each_command_takes():
    train = _help("train")
    assert "--weights" not in train and "onnx" not in train and "torch or mindspore" in train
    bench = _help("benchmark")
    assert "--batch-sizes B [B ...] batch sizes to time, one table each (default: [1, 64])" in bench
    assert "one per exit but the last" in _help("serve")


def test_the_accuracy_plot_legend_hides_no_marker(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from dvt_core.cli import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, **kw: figures.append(fig))
    # a small model trained from scratch on 3 classes: the last exit is the least accurate, at the lower right
    macs, accuracy = [1.05e6, 5.13e6, 19.2e6], [56.0, 44.0, 33.0]
    budgets = [{"macs": m, "accuracy": a} for m, a in ((1.3e6, 55.0), (4e6, 50.0), (9e6, 41.0), (14e6, 35.0))]
    plots.accuracy_macs_plot(tmp_path / "p.png", "mydata", macs, accuracy, budgets, grids=[2, 4, 7],
                             default={"macs": 2.1e6, "accuracy": 54.0})
    fig = figures[0]
    fig.canvas.draw()
    ax = fig.axes[0]
    box = ax.get_legend().get_window_extent()
    for line in ax.get_lines():
        for x, y in ax.transData.transform(np.c_[line.get_xdata(), line.get_ydata()]):
            assert not box.contains(x, y), f"the legend covers {line.get_label()}"
    renderer = fig.canvas.get_renderer()
    for text in ax.texts:  # the exits' labels too
        assert not box.overlaps(text.get_window_extent(renderer)), f"the legend covers {text.get_text()}"


def test_a_library_warning_is_one_note_line(tmp_path, pictures):
    ck = read_checkpoint(SHIPPED)
    wide = write_checkpoint(tmp_path / "f64.safetensors", {k: v.astype(np.float64) for k, v in ck.state.items()},
                            ck.meta)
    proc = dvt("predict", "--weights", wide, "--quiet", *pictures[:1])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("# note: ") and "cast on load" in lines[0], proc.stderr
    assert "warnings.warn" not in proc.stderr and "CheckpointWarning" not in proc.stderr


@pytest.mark.hostile
def test_metadata_out_of_range_is_refused_by_calibrate(tmp_path):
    ck = read_checkpoint(SHIPPED)
    big = write_checkpoint(tmp_path / "big.safetensors", ck.state, {**ck.meta, "holdout": 10 ** 12})
    refused(run(["calibrate", "--weights", big, "--budget", "3M", "--out", tmp_path / "o.safetensors"], tmp_path),
            "1000000000000", "60000")
    record = {"name": "mine", "path": str(tmp_path), "images": 40, "holdout": 10 ** 12, "seed": 0}
    bad = write_checkpoint(tmp_path / "bad.safetensors", ck.state, {**ck.meta, "dataset": record})
    refused(run(["calibrate", "--weights", bad, "--budget", "3M", "--out", tmp_path / "o.safetensors"], tmp_path),
            "holdout", "more than its 40 images")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.hostile
def test_a_tensor_name_with_terminal_escapes_is_printed_escaped(tmp_path, pictures):
    ck = read_checkpoint(SHIPPED)
    state = dict(ck.state)
    state["stages.0.\x1b]0;owned\x07\x1b[2Jhead.extra"] = np.zeros(3, np.float32)
    p = write_checkpoint(tmp_path / "esc.safetensors", state, ck.meta)
    line = refused(run(["predict", "--weights", p, pictures[0]], tmp_path))
    assert "\x1b" not in line and "\x07" not in line and "\\x1b" in line, repr(line)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two small DVT-DeiT exports alike but for their class count (10, 7), and one of another width."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dvt_core.export.writer import export_model

    root = tmp_path_factory.mktemp("exports")
    out = {}
    for key, extra in (("ten", {}), ("seven", {"num_classes": 7}), ("wide", {"embed_dim": 48})):
        model = dvt_core.build("dvt_deit_small", backend="torch", **{**SMALL, **extra}).eval()
        out[key] = export_model(model, "onnx", root / key)
    return out


def _graft(exports, tmp_path, donor: str, stage: int):
    """The 10-class export with stage ``stage``'s graph taken from ``donor``, its manifest's hash updated."""
    d = tmp_path / "e"
    shutil.copytree(exports["ten"], d)
    m = json.loads((d / "dvt.json").read_text())
    graph = m["stages"][stage]["file"]
    shutil.copyfile(exports[donor] / graph, d / graph)
    m["stages"][stage]["sha256"] = sha256_of(d / graph)
    (d / "dvt.json").write_text(json.dumps(m))
    return d


@pytest.mark.export
@pytest.mark.hostile
@pytest.mark.parametrize("donor, stage, needle", [("seven", 2, "logits of shape [2, 7]"),
                                                  ("wide", 1, "stage 2 of 3 cannot run")])
@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_export_graphs_of_another_shape_are_refused_when_opened(exports, tmp_path, donor, stage, needle, backend):
    pytest.importorskip(backend)
    d = _graft(exports, tmp_path, donor, stage)
    with pytest.raises(dvt_core.DVTError, match=needle.replace("[", r"\[")):
        dvt_core.build(d, backend=backend)
    dvt_core.build(exports["ten"], backend=backend)  # the untouched export opens


def test_the_ray_data_predictor_reads_the_column_from_numpy_makes():
    """``ray.data.from_numpy(images)`` names its one column "data": the predictor takes it as the images."""
    from dvt_core.integrations.ray import DVTPredictor

    pred = DVTPredictor(FM)
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    out = pred({"data": images})
    assert "data" not in out and out["class_index"].tolist() == pred.predict(images).prediction.tolist()
    with pytest.raises(dvt_core.InputError, match="no 'image' column"):
        pred({"data": images, "index": np.arange(3)})  # among other columns "data" is not taken for the images
