"""``dvt export --format pt2``: one AOTInductor package per stage, and the ``pt2`` runtime that loads them
without compiling. One small model, exported once for the module (AOTInductor compiles each stage: the
slow part); parity with eager torch to 1e-4 with identical exits, the export's checks as for ONNX."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import dvt_core
from dvt_core.errors import InputError, ManifestError
from dvt_core.export.manifest import MANIFEST

from helpers import SMALL, dvt, random_images

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from dvt_core.export.writer import export_model

    torch.manual_seed(0)
    model = dvt_core.build("dvt_deit_tiny", **SMALL).eval()
    out = export_model(model, "pt2", tmp_path_factory.mktemp("pt2") / "dvt")
    return model, out


def test_packages_give_eager_logits_at_every_batch_size(exported):
    model, out = exported
    loaded = dvt_core.build(out, backend="pt2", trust_native_code=True)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["graph_format"] == "pt2" and [st["file"] for st in manifest["stages"]] == \
        ["stage1.pt2", "stage2.pt2", "stage3.pt2"]
    x = random_images(model.spec, 5, seed=1)
    for n in (1, 2, 5):  # one axis, dynamic: the export itself ran at batch 2
        with torch.no_grad():
            want = [t.numpy() for t in model(torch.from_numpy(x[:n]))]
        got = loaded(x[:n])
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-4)


def test_early_exit_leaves_at_the_same_exits(exported):
    model, out = exported
    loaded = dvt_core.build(out, backend="pt2", trust_native_code=True)
    x = random_images(model.spec, 12, seed=2)
    with torch.no_grad():
        conf = [np.sort(o.softmax(-1).amax(-1).numpy()) for o in model(torch.from_numpy(x))]
    thresholds = [float(c[len(c) // 2 - 1:len(c) // 2 + 1].mean()) for c in conf[:2]]  # between two images
    want = model.adaptive(x, thresholds)
    got = loaded.adaptive(x, thresholds)
    assert len(set(want.exit_index.tolist())) > 1
    np.testing.assert_array_equal(got.exit_index, want.exit_index)
    np.testing.assert_array_equal(got.prediction, want.prediction)
    np.testing.assert_allclose(got.logits, want.logits, rtol=0, atol=1e-4)


def test_a_modified_package_is_refused_before_it_is_loaded(exported, tmp_path):
    _, out = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    package = copy / "stage2.pt2"
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0xFF
    package.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="SHA-256"):
        dvt_core.build(copy, backend="pt2", trust_native_code=True)
    (copy / "stage2.pt2").unlink()
    shutil.copy(out / "stage2.pt2", copy / "stage2.pt2")
    (copy / "extra.so").write_bytes(b"\x7fELF")  # a file the manifest does not list
    with pytest.raises(ManifestError):
        dvt_core.build(copy, backend="pt2", trust_native_code=True)


def test_the_runtime_says_what_it_cannot_do(exported):
    _, out = exported
    with pytest.raises(InputError, match="compiled in fp32, not bf16"):
        dvt_core.build(out, backend="pt2", precision="bf16", trust_native_code=True)
    with pytest.raises(InputError, match="CPU"):
        dvt_core.build(out, backend="pt2", device="cuda", trust_native_code=True)
    with pytest.raises(InputError, match="onnx graphs|pt2 graphs"):
        dvt_core.build(out, backend="onnx")


def test_native_code_is_opened_only_when_trusted(exported, tmp_path):
    # the folder's hashes say it is unchanged since it was written, not who wrote it: loading runs its code
    _, out = exported
    with pytest.raises(InputError, match="trust_native_code=True"):
        dvt_core.build(out, backend="pt2")
    (tmp_path / "a.png").write_bytes(b"not read: the folder is refused first")
    proc = dvt("predict", "--weights", out, "--backend", "pt2", tmp_path / "a.png")
    assert proc.returncode == 2 and "--trust-native-code" in proc.stderr and "Traceback" not in proc.stderr


# ---- packages compiled in bf16 ------------------------------------------------------------------------

BF16_LOGITS_ATOL = 2e-2  # bf16 keeps 8 bits of mantissa: eager and compiled kernels round differently


@pytest.fixture(scope="module")
def exported_bf16(exported):
    """The same small model compiled in bf16 (float32 images in, cast inside the graph), and that model held in
    bf16 in eager torch: what the packages must agree with."""
    import copy

    from dvt_core.export.writer import export_model

    model, fp32_dir = exported
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export_model(model, "pt2", fp32_dir.parent / "bf16", precision="bf16")
    assert model.dtype == torch.float32  # the caller's model is not cast (bf16 and back would round it)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    return copy.deepcopy(model).set_precision("bf16").eval(), out


def test_bf16_packages_agree_with_eager_bf16(exported_bf16):
    eager, out = exported_bf16
    assert json.loads((out / MANIFEST).read_text())["precision"] == "bf16"
    loaded = dvt_core.build(out, backend="pt2", trust_native_code=True)  # the package's own precision by default
    assert loaded.precision == "bf16"
    x = random_images(eager.spec, 5, seed=3)
    for n in (1, 5):
        with torch.no_grad():
            want = [t.float().numpy() for t in eager(torch.from_numpy(x[:n]))]
        got = loaded(x[:n])
        for g, w in zip(got, want):
            assert g.dtype == np.float32 and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=0, atol=BF16_LOGITS_ATOL)


def test_bf16_early_exit_leaves_at_the_same_exits(exported_bf16):
    eager, out = exported_bf16
    loaded = dvt_core.build(out, backend="pt2", precision="bf16", trust_native_code=True)
    # images of contrasts from 0.03x to 30x: the small random model's confidences spread (0.108 to 0.114)
    x = random_images(eager.spec, 12, seed=5) * np.logspace(-1.5, 1.5, 12, dtype=np.float32)[:, None, None, None]
    with torch.no_grad():
        conf = [o.float().softmax(-1).amax(-1).numpy() for o in eager(torch.from_numpy(x))]
    rounding = max(float(np.abs(c - torch.from_numpy(g).softmax(-1).amax(-1).numpy()).max())
                   for c, g in zip(conf, loaded(x)))
    first = np.sort(conf[0])[2:-2]  # at least two images on either side
    k = int(np.diff(first).argmax())  # the threshold in the widest gap, far from every image's confidence
    assert first[k + 1] - first[k] > 4 * rounding, (first, rounding)
    thresholds = [float(first[k:k + 2].mean()), 1.0]  # then no one leaves at exit 2: the carry reaches stage 3
    want = eager.adaptive(x, thresholds)
    got = loaded.adaptive(x, thresholds)
    assert set(want.exit_index.tolist()) == {0, 2}
    np.testing.assert_array_equal(got.exit_index, want.exit_index)
    np.testing.assert_array_equal(got.prediction, want.prediction)
    np.testing.assert_allclose(got.logits, want.logits, rtol=0, atol=BF16_LOGITS_ATOL)


def test_a_package_runs_only_in_the_precision_it_was_compiled_in(exported, exported_bf16, tmp_path):
    _, fp32_dir = exported
    _, bf16_dir = exported_bf16
    with pytest.raises(InputError, match="compiled in bf16, not fp32"):
        dvt_core.build(bf16_dir, backend="pt2", precision="fp32", trust_native_code=True)
    with pytest.raises(InputError, match="compiled in fp32, not fp16"):
        dvt_core.build(fp32_dir, backend="pt2", precision="fp16", trust_native_code=True)
    copy = tmp_path / "copy"
    shutil.copytree(bf16_dir, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["precision"] = "int8"  # the manifest is untrusted input
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="precision 'int8'"):
        dvt_core.build(copy, backend="pt2", trust_native_code=True)


def test_a_precision_a_format_cannot_write_is_refused_in_one_line(tmp_path):
    proc = dvt("export", "dvt_fashion_mnist", "--weights", "default", "--format", "mindir", "--precision", "bf16",
               "--out", tmp_path / "out")
    assert proc.returncode == 2 and "mindir exports are written in fp32, not bf16" in proc.stderr
    proc = dvt("export", "dvt_fashion_mnist", "--weights", "default", "--format", "onnx", "--precision", "bf16",
               "--out", tmp_path / "out")
    assert proc.returncode == 2 and "onnx exports are written in fp32 or fp16, not bf16" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
