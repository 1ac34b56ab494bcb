"""The OpenVINO runtime of ONNX exports: parity with torch, precision and threads, the contract, a runtime
free of torch and MindSpore, the command line, and the pins."""
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
from dvt_core.errors import InputError
from dvt_core.export.writer import export_model

from helpers import SMALL, dvt, median_thresholds
from strict_skips import in_ci

if in_ci():  # a module-level skip escapes strict_skips' per-test check: in CI a missing runtime fails collection
    import openvino
    import torch
else:
    openvino = pytest.importorskip("openvino")
    torch = pytest.importorskip("torch")

pytestmark = pytest.mark.export
ROOT = Path(__file__).resolve().parents[1]
BLOCK = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked in this test)", name=name)
sys.meta_path.insert(0, _Block())
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small DVT-DeiT (both reuse paths), its ONNX export, sample images, torch's logits and thresholds."""
    torch.manual_seed(0)
    model = dvt_core.build("dvt_deit_small", backend="torch", **SMALL).eval()
    images = np.random.default_rng(1).standard_normal((9, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = [o.numpy() for o in model(torch.from_numpy(images))]
    from dvt_core.runtime import policy

    # about half the images leave at every exit, none near a threshold
    thresholds = median_thresholds([policy.softmax(lg).max(1) for lg in ref], gap=2e-4) + [-1e8]
    model.checkpoint_meta = {"thresholds": thresholds, "classes": [f"c{i}" for i in range(10)]}
    out = export_model(model, "onnx", tmp_path_factory.mktemp("export") / "deit")
    return model, out, images, ref, thresholds


def ref_rows(model, images, exit_index: int, rows) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images[rows]))[exit_index].numpy()


def run_py(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_pin_in_setup_makefile_and_installed():
    """The openvino extra pins the version checked to import beside torch and MindSpore with numpy 1.26."""
    text = (ROOT / "setup.py").read_text()
    assert '"openvino==2026.4.1"' in text and '"openvino": OPENVINO' in text
    assert openvino.__version__.startswith("2026.4.1") and np.__version__ == "1.26.4"
    install = (ROOT / "Makefile").read_text().split("pip install --quiet -e")[1].splitlines()[0]
    assert "openvino" in install


@pytest.mark.mindspore
def test_openvino_imports_beside_torch_and_mindspore():
    pytest.importorskip("mindspore")
    r = run_py("""
        import torch, mindspore as ms, openvino as ov, onnxruntime, numpy as np
        assert "CPU" in ov.Core().available_devices
        print(float((ms.Tensor(np.ones(3, np.float32)) * 2).sum()))
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("6.0") and "Numpy init failed" not in r.stderr


def test_fp32_matches_torch_logits_and_exits(exported):
    model, out, images, ref, thresholds = exported
    rt = dvt_core.build(out, backend="openvino")
    assert rt.backend_name == "openvino" and rt.precision == "fp32" and rt.inference_precision == "fp32"
    ours = rt(images)
    assert len(ours) == 3
    for a, b in zip(ours, ref):
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (9, 10)
        np.testing.assert_allclose(a, b, atol=1e-4)
    res = rt.adaptive(images)  # the manifest's thresholds
    ref_res = model.adaptive(torch.from_numpy(images), thresholds)
    np.testing.assert_array_equal(res.exit_index, ref_res.exit_index)
    assert len(set(res.exit_index.tolist())) > 1, "the thresholds should split the batch over exits"
    np.testing.assert_array_equal(res.macs, np.asarray(dvt_core.exit_macs(model.spec))[res.exit_index])


def test_every_batch_size_matches_batch_of_all(exported):
    """Batch 1 (compiled with static shapes) and other sizes (dynamic) give the same logits."""
    _, out, images, ref, _ = exported
    rt = dvt_core.build(out, backend="openvino")
    for n in (1, 2, 5):
        for a, b in zip(rt(images[:n]), ref):
            np.testing.assert_allclose(a, b[:n], atol=1e-4)


def test_precision_and_threads(exported):
    """bf16 and fp16 run (on a CPU without them OpenVINO picks the nearest it has, and says which);
    their logits stay near fp32's; threads are set; bad values are refused by name."""
    from dvt_core.runtime import contract

    _, out, images, ref, _ = exported
    caps = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    rt = dvt_core.build(out, backend="openvino")
    for precision, needs in (("bf16", "BF16"), ("fp16", "FP16")):
        rt.set_precision(precision)
        assert rt.precision == precision
        assert rt.inference_precision in (precision if needs in caps else None, "bf16" if "BF16" in caps else "fp32")
        worst = max(float(np.abs(a - b).max()) for a, b in zip(rt(images), ref))
        scale = max(float(np.abs(b).max()) for b in ref)
        assert worst < 0.05 * scale + 0.05, (precision, worst, scale)
    rt.set_precision("fp32").set_threads(1)
    assert rt.threads == 1 and rt.compiled[0].get_property("INFERENCE_NUM_THREADS") == 1
    np.testing.assert_allclose(rt(images)[2], ref[2], atol=1e-4)
    with pytest.raises(InputError, match="runs fp32, bf16, fp16, not 'int4'"):
        rt.set_precision("int4")
    with pytest.raises(InputError, match="threads must be a positive"):
        rt.set_threads(0)
    with pytest.raises(InputError, match="unknown OpenVINO device 'cuda'"):
        rt.to_device("cuda")
    with pytest.raises(InputError, match="runs fp32, bf16, fp16, not 'fp8'"):
        contract.get_backend("openvino").open(out, precision="fp8")
    with pytest.raises(InputError, match="threads must be a positive"):
        dvt_core.build(out, backend="openvino", threads=-1)
    built = dvt_core.build(out, backend="openvino", precision="bf16", threads=1)
    assert (built.precision, built.threads) == ("bf16", 1)
    assert built.compiled[2].get_property("INFERENCE_NUM_THREADS") == 1


def test_graph_runtime_drives_early_exit_and_evaluation(exported):
    """The registered runtime is a GraphRuntime (no framework members); its primitives drive dvt_core's
    early-exit loop, streaming's join and the evaluation helpers like a framework's."""
    from dvt_core.runtime import contract, evaluation
    from dvt_core.runtime.early_exit import run_adaptive

    model, out, images, _, thresholds = exported
    b = contract.get_backend("openvino")
    assert isinstance(b, contract.GraphRuntime) and b.name == "openvino" and not hasattr(b, "build_model")
    rt = b.open(out)
    assert contract.backend_of(rt) is b
    x = b.to_tensor(rt, images)
    with b.inference(rt):
        res = run_adaptive(b, rt, x, thresholds)
    np.testing.assert_array_equal(res.exit_index, model.adaptive(torch.from_numpy(images), thresholds).exit_index)
    _, carry = b.run_stage(rt, 0, x)  # streaming early exit joins the rows of several batches
    joined = b.join([b.select(x, carry, [0, 2]), b.select(x, carry, [5])])
    np.testing.assert_allclose(b.to_numpy(b.run_stage(rt, 1, *joined)[0]), ref_rows(model, images, 1, [0, 2, 5]),
                               atol=1e-4)
    raw = np.random.default_rng(2).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(evaluation.exit_probs(rt, raw, batch_size=4),
                               evaluation.exit_probs(model, raw, batch_size=4), atol=1e-5)


def test_build_by_name_checks_the_model(exported):
    from dvt_core.errors import CheckpointError

    _, out, _, _, _ = exported
    assert dvt_core.build("dvt_deit_small", backend="openvino", weights=out).spec.name == "dvt_deit_small"
    with pytest.raises(CheckpointError, match="export of dvt_deit_small, not dvt_t2t_vit_12"):
        dvt_core.build("dvt_t2t_vit_12", backend="openvino", weights=out)


def test_runtime_imports_neither_torch_nor_mindspore(exported, tmp_path):
    _, out, images, ref, _ = exported
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "ref.npy", np.stack(ref))
    code = BLOCK.format(blocked='{"torch", "mindspore", "onnxruntime"}') + f"""
import numpy as np, dvt_core
x = np.load({str(tmp_path / 'x.npy')!r}); ref = np.load({str(tmp_path / 'ref.npy')!r})
m = dvt_core.build({str(out)!r}, backend="openvino")
assert max(float(np.abs(a - b).max()) for a, b in zip(m(x), ref)) < 1e-4
res = m.adaptive(x)
assert len(res.exit_index) == len(x)
assert not any(k.split(".")[0] in ("torch", "mindspore", "onnxruntime") for k in sys.modules)
print("ok", res.exit_counts.tolist())
"""
    r = run_py(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")


def test_missing_openvino_is_a_clear_error(exported):
    _, out, _, _, _ = exported
    code = BLOCK.format(blocked='{"openvino"}') + f"""
import dvt_core
try:
    dvt_core.build({str(out)!r}, backend="openvino")
except dvt_core.InputError as exc:
    print("InputError:", exc)
"""
    r = run_py(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "InputError: the openvino backend needs the openvino package" in r.stdout
    assert "pip install 'dvt[openvino]'" in r.stdout


# ---- the command line -------------------------------------------------------------------------------------


def test_cli_predict_and_demo_on_openvino(fashion_cli):
    files = ["img0.png", "img1.png", "img2.png"]
    r = dvt("predict", "--backend", "openvino", "--weights", "fm", "--json", *files, cwd=fashion_cli)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = dvt("predict", "--model", "dvt_fashion_mnist", "--json", *files, cwd=fashion_cli)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ours = [json.loads(x) for x in r.stdout.splitlines()]
    theirs = [json.loads(x) for x in ref.stdout.splitlines()]
    assert len(ours) == 3
    assert [(o["prediction"], o["exit"], o["macs"]) for o in ours] == \
        [(o["prediction"], o["exit"], o["macs"]) for o in theirs]
    d = dvt("demo", "--backend", "openvino", "--weights", "fm", "--limit", "0", "--out", "d.png", cwd=fashion_cli)
    assert d.returncode == 0, d.stderr[-2000:]
    assert "openvino" in d.stdout and "accuracy:" in d.stdout


def test_cli_bad_export_is_one_line(fashion_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    r = dvt("predict", "--backend", "openvino", "--weights", tmp_path / "empty", fashion_cli / "img0.png",
            cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dvt predict: error:") and "is not a dvt export" in lines[0]


# ---- graph forms: the reuse resize and the weights' precision --------------------------------------------


@pytest.mark.parametrize("resize", ["gather", "dense"])
def test_resize_forms_match_torch_in_both_runtimes(exported, tmp_path, resize):
    import onnx

    model, _, images, ref, _ = exported
    out = export_model(model, "onnx", tmp_path / resize, resize=resize)
    manifest = json.loads((out / "dvt.json").read_text())
    assert manifest["resize"] == resize and manifest["precision"] == "fp32"
    ops = {n.op_type for n in onnx.load(str(out / "stage2.onnx")).graph.node}
    assert ("ReduceSum" in ops) == (resize == "gather"), ops
    for runtime in ("openvino", "onnx"):
        for a, b in zip(dvt_core.build(out, backend=runtime)(images), ref):
            np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"{runtime}, resize {resize}")


def test_fp16_weights_halve_the_graphs_and_stay_close(exported, tmp_path):
    import onnx

    model, fp32_dir, images, ref, _ = exported
    out = export_model(model, "onnx", tmp_path / "half", precision="fp16")
    assert json.loads((out / "dvt.json").read_text())["precision"] == "fp16"
    graph = onnx.load(str(out / "stage1.onnx")).graph
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
    for name in ("stage1.onnx", "stage2.onnx", "stage3.onnx"):
        assert (out / name).stat().st_size < 0.7 * (fp32_dir / name).stat().st_size
    scale = max(float(np.abs(b).max()) for b in ref)
    for runtime in ("openvino", "onnx"):
        ours = dvt_core.build(out, backend=runtime)(images)
        worst = max(float(np.abs(a - b).max()) for a, b in zip(ours, ref))
        assert 0 < worst < 1e-2 * scale, (runtime, worst, scale)  # float16 rounding of the weights, no more


def test_bad_graph_options_are_refused(exported, tmp_path):
    model, _, _, _, _ = exported
    with pytest.raises(InputError, match="unknown resize form 'sparse'"):
        export_model(model, "onnx", tmp_path / "a", resize="sparse")
    with pytest.raises(InputError, match="onnx exports are written in fp32 or fp16, not bf16"):
        export_model(model, "onnx", tmp_path / "b", precision="bf16")  # OpenVINO's bf16 is a runtime choice
    with pytest.raises(InputError, match="unknown export precision 'fp64'"):
        export_model(model, "onnx", tmp_path / "c", precision="fp64")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_batch_1_outputs_outlive_the_next_call_and_join_as_streaming_does(exported, backend):
    """Two images run one at a time through stage 1: the first call's logits and carry stay as they were after
    the second call (OpenVINO's fixed-shape request reuses its buffers), and the two carries joined (what
    streaming early exit does) give stage 2 the logits of the two images run as one batch."""
    from dvt_core.runtime.contract import backend_of

    _, out, images, _, _ = exported
    model = dvt_core.build(out, backend=backend, threads=1)
    runtime = backend_of(model)
    a, b = images[:1], images[1:2]
    logits_a, carry_a = runtime.run_stage(model, 0, a)
    kept = np.array(logits_a), {k: np.array(v) for k, v in carry_a.items()}
    logits_b, carry_b = runtime.run_stage(model, 0, b)
    assert np.array_equal(logits_a, kept[0]) and not np.allclose(logits_a, logits_b)
    for k, v in carry_a.items():
        assert np.array_equal(v, kept[1][k]) and not np.allclose(v, carry_b[k])
    joined_images, joined = runtime.join([(a, carry_a), (b, carry_b)])
    logits, _ = runtime.run_stage(model, 1, joined_images, joined)
    expected, _ = runtime.run_stage(model, 1, images[:2], runtime.run_stage(model, 0, images[:2])[1])
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_batch_1_refuses_a_carry_of_another_shape(exported):
    """A batch-1 call copies into the request's own buffers: a carry of the wrong shape is an InputError,
    never broadcast into them."""
    _, out, images, _, _ = exported
    model = dvt_core.build(out, backend="openvino", threads=1)
    _, carry = model.run_stage(0, images[:1])
    key = next(iter(carry))
    carry[key] = carry[key][:, :1]
    with pytest.raises(InputError, match="shape"):
        model.run_stage(1, images[:1], carry)


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_early_exit_one_image_at_a_time_takes_the_batch_exits(exported, backend):
    """Batch 1 takes the host loop's shortcuts (no masks, slices for the rows): every image's exit, prediction,
    logits and per-exit confidences are those of the same image in the whole batch."""
    _, out, images, _, thresholds = exported
    model = dvt_core.build(out, backend=backend, threads=1)
    whole = model.adaptive(images, thresholds)
    assert 0 < whole.exit_counts[0] < len(images)  # the thresholds send images to more than one exit
    for j in range(len(images)):
        one = model.adaptive(images[j:j + 1], thresholds)
        assert one.exit_index[0] == whole.exit_index[j] and one.prediction[0] == whole.prediction[j]
        assert one.macs[0] == whole.macs[j] and one.exit_counts[one.exit_index[0]] == 1
        np.testing.assert_allclose(one.logits[0], whole.logits[j], atol=1e-5)
        np.testing.assert_allclose(one.exit_confidences[0], whole.exit_confidences[j], atol=1e-5)  # NaN alike
