"""Per-stage ONNX export: the manifest, atomic writes, bad input, and a runtime free of torch and MindSpore."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import dvt_core
from dvt_core.errors import CheckpointError, InputError
from dvt_core.export.manifest import MANIFEST, read_manifest, sha256_of
from dvt_core.export.writer import export_model
from helpers import BLOCK_IMPORTS, cli, median_thresholds

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.export
ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(img_size=32, grids=(2, 3, 4), depth=2, embed_dim=32, num_heads=2, num_classes=10)
THRESHOLDS = []  # set by the fixture: near each exit's median confidence on the sample images, none on one


def _median_confidences(model, images) -> list:
    with torch.no_grad():
        out = model(torch.from_numpy(images))
    return median_thresholds([torch.softmax(o, 1).max(1).values.numpy() for o in out], gap=2e-4) + [-1e8]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small DVT-DeiT, its ONNX export (with default thresholds in its metadata) and sample images."""
    torch.manual_seed(0)
    model = dvt_core.build("dvt_deit_small", backend="torch", **SMALL).eval()
    images = np.random.default_rng(1).standard_normal((9, 3, 32, 32)).astype(np.float32)
    THRESHOLDS[:] = _median_confidences(model, images)
    model.checkpoint_meta = {"thresholds": THRESHOLDS, "classes": [f"c{i}" for i in range(10)],
                             "budgets": [{"budget": 1, "thresholds": THRESHOLDS}]}
    out = export_model(model, "onnx", tmp_path_factory.mktemp("export") / "deit")
    return model, out, images


def run_py(code: str, timeout: int = 300, extra_path: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (extra_path, str(ROOT)) if p))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_pins_in_setup_and_installed():
    """The onnx extra pins the versions checked to import beside MindSpore 2.10 (numpy < 2)."""
    import onnx
    import onnxruntime

    text = (ROOT / "setup.py").read_text()
    for pin in ("onnx==1.17.0", "onnxruntime==1.32.0", "numpy==1.26.4"):
        assert f'"{pin}"' in text
    assert (onnx.__version__, onnxruntime.__version__, np.__version__) == ("1.17.0", "1.32.0", "1.26.4")
    assert "onnx," in (ROOT / "Makefile").read_text().split("pip install --quiet -e")[1].splitlines()[0]


@pytest.mark.mindspore
def test_pins_import_beside_mindspore_and_torch():
    pytest.importorskip("mindspore")
    r = run_py("""
        import onnx, onnxruntime, torch, mindspore as ms, numpy as np
        print(float((ms.Tensor(np.ones(3, np.float32)) * 2).sum()))
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("6.0")
    assert "Numpy init failed" not in r.stderr


def test_manifest(exported):
    model, out, _ = exported
    m = json.loads((out / MANIFEST).read_text())
    spec = model.spec
    assert m["model"] == "dvt_deit_small" and m["graph_format"] == "onnx"
    assert dvt_core.CascadeSpec.from_dict(m["spec"]) == spec
    assert m["exit_macs"] == list(dvt_core.exit_macs(spec))
    assert m["thresholds"] == THRESHOLDS and m["classes"] == [f"c{i}" for i in range(10)]
    assert m["budgets"] == [{"budget": 1, "thresholds": THRESHOLDS}]
    assert m["mean"] == list(spec.mean) and m["std"] == list(spec.std)
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["opset"] == 17
    assert [s["file"] for s in m["stages"]] == ["stage1.onnx", "stage2.onnx", "stage3.onnx"]
    assert m["stages"][0]["inputs"] == ["images"]
    assert m["stages"][1]["inputs"] == ["images", "prev_features", "prev_relations"]
    assert m["stages"][2]["outputs"] == ["logits"]
    for s in m["stages"]:
        assert s["sha256"] == sha256_of(out / s["file"])
    assert sorted(p.name for p in out.iterdir()) == ["dvt.json", "stage1.onnx", "stage2.onnx", "stage3.onnx"]


def test_graphs_have_dynamic_batch(exported):
    import onnxruntime as ort

    _, out, _ = exported
    s = ort.InferenceSession(str(out / "stage2.onnx"), providers=["CPUExecutionProvider"])
    for t in s.get_inputs() + s.get_outputs():
        assert isinstance(t.shape[0], str), f"{t.name} has a fixed batch axis {t.shape}"


def test_runtime_matches_torch(exported):
    model, out, images = exported
    rt = dvt_core.build(out, backend="onnx")
    ours = rt(images)
    with torch.no_grad():
        ref = model(torch.from_numpy(images))
    assert len(ours) == 3
    for a, b in zip(ours, ref):
        assert isinstance(a, np.ndarray) and a.shape == (9, 10)
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4)
    res = rt.adaptive(images)  # the manifest's thresholds
    ref_res = model.adaptive(torch.from_numpy(images), THRESHOLDS)
    np.testing.assert_array_equal(res.exit_index, ref_res.exit_index)
    assert len(set(res.exit_index.tolist())) > 1, "thresholds should split the batch over exits"
    np.testing.assert_array_equal(res.macs, np.asarray(dvt_core.exit_macs(model.spec))[res.exit_index])
    assert rt.checkpoint_meta["classes"][3] == "c3"


def test_build_by_name_and_weights_and_evaluation(exported):
    """build(NAME, backend="onnx", weights=DIR); dvt_core.runtime.evaluation drives the runtime like a backend."""
    from dvt_core.runtime import evaluation

    model, out, _ = exported
    rt = dvt_core.build("dvt_deit_small", backend="onnx", weights=out)
    assert evaluation.backend_of(rt).name == "onnx"
    raw = np.random.default_rng(2).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(evaluation.exit_probs(rt, raw, batch_size=4),
                               evaluation.exit_probs(model, raw, batch_size=4), atol=1e-5)
    a = evaluation.adaptive(rt, raw, THRESHOLDS, batch_size=4)
    b = evaluation.adaptive(model, raw, THRESHOLDS, batch_size=4)
    np.testing.assert_array_equal(a.exit_index, b.exit_index)


def test_export_refuses_existing_folder_without_force(exported, tmp_path):
    model, _, _ = exported
    target = tmp_path / "x"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="exists"):
        export_model(model, "onnx", target)
    with pytest.raises(InputError, match="not a dvt export"):
        export_model(model, "onnx", target, force=True)
    assert (target / "keep.txt").read_text() == "mine"


def test_export_force_replaces_an_export(exported, tmp_path):
    model, _, _ = exported
    target = export_model(model, "onnx", tmp_path / "e")
    (target / "stage1.onnx").write_bytes(b"junk")
    export_model(model, "onnx", target, force=True)
    read_manifest(target)  # graphs match their hashes again
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


def test_failed_export_leaves_nothing(exported, tmp_path, monkeypatch):
    from dvt_backends.torch import export as torch_export

    model, _, _ = exported

    def broken(*a, **k):
        raise RuntimeError("tracing failed")

    monkeypatch.setattr(torch_export, "export_stages", broken)
    with pytest.raises(RuntimeError, match="tracing failed"):
        export_model(model, "onnx", tmp_path / "never")
    assert list(tmp_path.iterdir()) == []


def test_not_an_export(tmp_path):
    with pytest.raises(InputError, match="not a dvt export"):
        dvt_core.build(tmp_path, backend="onnx")
    with pytest.raises(InputError, match="not a dvt export"):
        dvt_core.build(tmp_path / "missing", backend="onnx")
    (tmp_path / MANIFEST).write_text('{"hello": 1}')
    with pytest.raises(InputError, match="not a dvt export manifest"):
        dvt_core.build(tmp_path, backend="onnx")


def test_modified_graph_is_refused(exported, tmp_path):
    import shutil

    _, out, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "stage2.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="stage2.onnx: SHA-256 differs"):
        dvt_core.build(copy, backend="onnx")


def test_export_of_another_model_is_refused(exported):
    _, out, _ = exported
    with pytest.raises(CheckpointError, match="export of dvt_deit_small, not dvt_t2t_vit_12"):
        dvt_core.build("dvt_t2t_vit_12", backend="onnx", weights=out)


def test_wrong_graph_format_is_named(exported):
    _, out, _ = exported
    with pytest.raises(InputError, match="holds onnx graphs, not mindir"):
        read_manifest(out, fmt="mindir")


def test_runtime_checks_images(exported):
    _, out, images = exported
    rt = dvt_core.build(out, backend="onnx")
    with pytest.raises(InputError, match="32x32"):
        rt(images[:, :, :16, :16])
    with pytest.raises(InputError, match="3 channel"):
        rt(images[:, :1])


def test_onnx_runtime_imports_neither_torch_nor_mindspore(exported, tmp_path):
    model, out, images = exported
    np.save(tmp_path / "x.npy", images)
    with torch.no_grad():
        np.save(tmp_path / "ref.npy", np.stack([o.numpy() for o in model(torch.from_numpy(images))]))
    code = BLOCK_IMPORTS.format(blocked={"torch", "mindspore"}) + f"""
import numpy as np, dvt_core
x = np.load({str(tmp_path / 'x.npy')!r}); ref = np.load({str(tmp_path / 'ref.npy')!r})
m = dvt_core.build({str(out)!r}, backend="onnx")
out = m(x)
assert max(float(np.abs(a - b).max()) for a, b in zip(out, ref)) < 1e-4
res = m.adaptive(x)
assert len(res.exit_index) == len(x)
assert not any(k.split(".")[0] in ("torch", "mindspore") for k in sys.modules)
print("ok", res.exit_counts.tolist())
"""
    r = run_py(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")


def test_missing_onnxruntime_is_a_clear_error(exported):
    _, out, _ = exported
    code = BLOCK_IMPORTS.format(blocked={"onnxruntime"}) + f"""
import dvt_core
try:
    dvt_core.build({str(out)!r}, backend="onnx")
except dvt_core.InputError as exc:
    print("InputError:", exc)
"""
    r = run_py(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "InputError: the onnx backend needs the onnxruntime package" in r.stdout
    assert "pip install 'dvt[onnx]'" in r.stdout


# ---- the command line -------------------------------------------------------------------------------------


def dvt(*args, cwd, extra_path: str = "") -> subprocess.CompletedProcess:
    """The CLI in this process; with ``extra_path`` (modules that shadow installed ones) in a fresh one."""
    if not extra_path:
        return cli(*args, cwd=cwd)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (extra_path, str(ROOT)) if p))
    return subprocess.run([sys.executable, "-m", "dvt_core", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(r, command: str, fragment: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dvt {command}: error:") and fragment in lines[0], r.stderr


def test_cli_export_then_predict_matches_torch(fashion_cli):
    r = dvt("predict", "--backend", "onnx", "--weights", "fm", "--json", "img0.png", "img1.png", "img2.png",
            cwd=fashion_cli)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = dvt("predict", "--model", "dvt_fashion_mnist", "--json", "img0.png", "img1.png", "img2.png",
              cwd=fashion_cli)
    ours = [json.loads(x) for x in r.stdout.splitlines()]
    theirs = [json.loads(x) for x in ref.stdout.splitlines()]
    assert [(o["prediction"], o["exit"], o["macs"]) for o in ours] == \
        [(o["prediction"], o["exit"], o["macs"]) for o in theirs]


def test_cli_demo_on_onnx(fashion_cli):
    r = dvt("demo", "--backend", "onnx", "--weights", "fm", "--limit", "0", "--out", "d.png", cwd=fashion_cli)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "export of the shipped weights" in r.stdout and "accuracy:" in r.stdout


def test_cli_export_refuses_overwrite(fashion_cli):
    r = dvt("export", "dvt_fashion_mnist", "--weights", "default", "--format", "onnx", "--out", "fm", cwd=fashion_cli)
    one_line_error(r, "export", "exists; pass --force")


def test_cli_bad_exports(fashion_cli, tmp_path):
    import shutil

    (tmp_path / "empty").mkdir()
    one_line_error(dvt("predict", "--backend", "onnx", "--weights", tmp_path / "empty", fashion_cli / "img0.png",
                       cwd=tmp_path), "predict", "is not a dvt export")
    shutil.copytree(fashion_cli / "fm", tmp_path / "bad")
    with open(tmp_path / "bad" / "stage3.onnx", "ab") as f:
        f.write(b"x")
    one_line_error(dvt("predict", "--backend", "onnx", "--weights", tmp_path / "bad", fashion_cli / "img0.png",
                       cwd=tmp_path), "predict", "SHA-256 differs")
    one_line_error(dvt("predict", "--backend", "onnx", "--model", "dvt_deit_small", "--weights", fashion_cli / "fm",
                       fashion_cli / "img0.png", cwd=tmp_path), "predict", "export of dvt_fashion_mnist, not dvt_deit_small")
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "onnxruntime.py").write_text("raise ImportError('No module named onnxruntime')\n")
    one_line_error(dvt("predict", "--backend", "onnx", "--weights", fashion_cli / "fm", fashion_cli / "img0.png",
                       cwd=tmp_path, extra_path=str(blocker)), "predict", "needs the onnxruntime package")


def test_graph_runtime_drives_early_exit_like_a_framework(exported):
    """The onnx runtime's primitives (run_stage / select / to_numpy) drive dvt_core.runtime.early_exit like a
    framework's, and it has no framework members to refuse."""
    from dvt_core.runtime.contract import GraphRuntime, get_backend
    from dvt_core.runtime.early_exit import run_adaptive

    b = get_backend("onnx")
    model, out, images = exported
    rt = b.open(out)
    assert rt.backend_name == b.name == "onnx" and isinstance(b, GraphRuntime)
    x = b.to_tensor(rt, images)
    with b.inference(rt):
        res = run_adaptive(b, rt, x, THRESHOLDS)
    np.testing.assert_array_equal(res.exit_index, model.adaptive(torch.from_numpy(images), THRESHOLDS).exit_index)
    for member in ("build_model", "model_state", "load_state", "read_file", "write_file"):
        assert not hasattr(b, member), member


def test_reshape_targets_are_constants_but_the_batch_axis(exported):
    """Only the batch axis is dynamic, so no reshape reads its target from the tensor's shape: a stage has at
    most the two Shape nodes of the class token's broadcast, where the modules' own forms traced one per
    reshape (23 in the shipped model's first stage): at batch 1 every node costs the runtime a fixed time."""
    import onnx

    _, out, _ = exported
    for path in sorted(out.glob("stage*.onnx")):
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ops.count("Shape") <= 2, (path.name, ops.count("Shape"))
        assert ops.count("Reshape") >= 4  # the attention's reshapes are still there, with constant targets
