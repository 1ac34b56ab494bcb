"""Untrusted input through the one schema (dvt_core.schema): export folders, checkpoints people really have,
bounded reading, outputs that stay inside what the user named, arguments checked before any work.

Every hostile file is crafted here; commands run in subprocesses (status 2, one line, no traceback).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import dvt_core
from dvt_core import schema
from dvt_core.checkpoint import ms_ckpt
from dvt_core.checkpoint.files import MAX_TENSORS, read_checkpoint, write_checkpoint
from dvt_core.errors import ArgumentError, CheckpointError, DVTError, ManifestError, SpecError
from helpers import ROOT, refused, run

pytestmark = pytest.mark.hostile

FM = "dvt_fashion_mnist"
EXPORT_SMALL = dict(img_size=32, grids=(2, 3, 4), depth=1, embed_dim=16, num_heads=2, num_classes=10)


def _fm():
    from dvt_core.checkpoint.registry import default_weights_path

    return read_checkpoint(default_weights_path(FM, verify=False))


def _png(path, size=8):
    from PIL import Image

    Image.fromarray(np.full((size, size), 128, np.uint8), "L").save(path)
    return path


def _peak_rss_mb(code: str, timeout: int = 120) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``code`` in a fresh interpreter; its peak resident memory in MB and the process. (VmHWM, not
    ru_maxrss, which execve keeps from the parent: pytest's own peak would leak in.)"""
    wrapper = code + ("\nhwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]"
                      "\nprint('RSS', hwm.split()[1])\n")
    p = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RSS ")]
    return (int(line[-1].split()[1]) / 1024 if line else float("inf")), p


# ---- spec fields never become paths; overrides are typed, not YAML -------------------------------------------

def test_spec_name_is_never_a_path(tmp_path):
    out = tmp_path / "D"
    refused(run(["train", "--model", FM, "--out", out, "-O", "name=../escaped", "--max-steps", "1"], tmp_path),
            "not a plain name")
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"keep me")
    (out / "x").mkdir(parents=True)
    refused(run(["train", "--model", FM, "--out", out / "x", "--force", "-O", "name=../../victim"], tmp_path),
            "not a plain name")
    assert victim.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D", "victim.safetensors"]
    with pytest.raises(SpecError, match="plain name"):
        dvt_core.get_spec(FM, name="a/b")


@pytest.mark.parametrize("text, value", [("10", 10), ("-3", -3), ("1e-3", 1e-3), ("true", True), ("False", False),
                                         ("null", None), ("[2, 4, 7]", [2, 4, 7]), ("(2,4)", [2, 4]), ("[]", []),
                                         ("exact", "exact"), ("'7'", "7")])
def test_override_values_parse_typed(text, value):
    assert schema.parse_value(text) == value


@pytest.mark.parametrize("item", ["grids=[2,4", "grids=2,4]", "grids=[[2],[4]]", "x", "a b=1", "k=" + "9" * 5000])
def test_malformed_overrides_are_one_named_error(item):
    with pytest.raises(ArgumentError):
        schema.parse_overrides([item])


def test_unbalanced_override_is_one_line(tmp_path):
    refused(run(["flops", FM, "-O", "grids=[2,4,{"], tmp_path), "grids")


@pytest.mark.parametrize("override, needle", [("embed_dim=4000000", "embed_dim"), ("grids=[7,10,1000]", "grid"),
                                              ("img_size=100000", "img_size"), ("depth=100000", "depth")])
def test_huge_specs_are_refused_before_any_work(tmp_path, override, needle):
    refused(run(["flops", FM, "-O", override], tmp_path, timeout=60), needle)


# ---- arguments checked first ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [(["--lr", "inf"], "--lr"), (["--weight-decay", "nan"], "--weight-decay"),
                                          (["--warmup-epochs", "nan"], "--warmup-epochs"), (["--seed", "-1"], "--seed"),
                                          (["--lr", "0"], "--lr"), (["--epochs", "1.5"], "--epochs")])
def test_train_arguments_are_checked_first(tmp_path, args, needle):
    refused(run(["train", "--model", FM, "--out", tmp_path / "o", *args], tmp_path, timeout=60), needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, needle", [(["--split", "nan", "0.5", "0.5"], "--split"),
                                          (["--batch-sizes", "100000000"], "--batch-sizes"),
                                          (["--seed", "-1"], "--seed"), (["--images", "0"], "--images")])
def test_benchmark_arguments_are_checked_first(tmp_path, args, needle):
    refused(run(["benchmark", FM, *args], tmp_path, timeout=60), needle)


def test_train_config_validates_in_the_library():
    from dvt_core.training.config import TrainConfig, check_train_config

    for field, bad in (("lr", float("inf")), ("weight_decay", float("nan")), ("seed", -1), ("batch_size", 0),
                       ("holdout", 1.5), ("label_smoothing", 1.0)):
        cfg = TrainConfig()
        setattr(cfg, field, bad)
        with pytest.raises(ArgumentError, match=field):
            check_train_config(cfg)
    assert check_train_config(TrainConfig()) is not None


# ---- checkpoints people really have --------------------------------------------------------------------

def _torch_file(path, state, meta=None):
    import torch

    torch.save({"state_dict": state, "dvt_meta": json.dumps(meta or {})}, str(path))
    return path


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_torch_and_safetensors_load(tmp_path, dtype):
    import torch
    from safetensors.torch import save_file

    ck = _fm()
    tdt = getattr(torch, dtype)
    half = {k: torch.from_numpy(v.copy()).to(tdt) for k, v in ck.state.items()}
    expected = {k: v.float().numpy() for k, v in half.items()}  # the exact widening, computed by torch
    pth = _torch_file(tmp_path / "h.pth", half, ck.meta)
    st = tmp_path / "h.safetensors"
    save_file(half, str(st), metadata={"dvt": json.dumps(ck.meta)})
    for path in (pth, st):
        model = dvt_core.build(FM, weights=path)
        casts = model.checkpoint_meta.get("load_casts") or []
        assert casts and all(f"{dtype} -> float32" in c for c in casts), casts[:2]
        back = model.state_dict()
        k = sorted(expected)[5]
        assert np.array_equal(back[k].numpy(), expected[k])


def test_fp8_sparse_quantized_complex_are_refused_by_name(tmp_path):
    import torch

    ck = _fm()
    k = sorted(ck.state)[0]
    base = {n: torch.from_numpy(v.copy()) for n, v in ck.state.items()}
    variants = {
        "float8_e4m3fn": base[k].to(torch.float8_e4m3fn),
        "sparse": base[k].reshape(-1).to_sparse(),
        "quantized": torch.quantize_per_tensor(base[k], 0.1, 0, torch.qint8),
        "complex": base[k].to(torch.complex64),
    }
    for label, tensor in variants.items():
        state = dict(base)
        state[k] = tensor
        p = _torch_file(tmp_path / f"{label}.pth", state)
        with pytest.raises(CheckpointError, match=label.split("_")[0]) as info:
            read_checkpoint(p)
        assert k in str(info.value)
    # safetensors names its fp8 dtype in the header: refused before a byte of it is read
    header = json.dumps({k: {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}).encode()
    p = tmp_path / "f8.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match="F8_E4M3"):
        read_checkpoint(p)


def test_release_file_with_a_list_state_dict(tmp_path):
    import torch

    torch.save({"model_state_dict": [1, 2, 3], "flops": [1.0]}, str(tmp_path / "r.pth.tar"))
    with pytest.raises(CheckpointError, match="model_state_dict is a list"):
        read_checkpoint(tmp_path / "r.pth.tar")
    refused(run(["predict", "--model", FM, "--weights", tmp_path / "r.pth.tar", _png(tmp_path / "a.png")],
                tmp_path), "model_state_dict")


@pytest.mark.parametrize("meta, field", [
    ({"thresholds": "abc"}, "thresholds"), ({"thresholds": [0.5, float("nan"), 1]}, "thresholds"),
    ({"budgets": [{"thresholds": "x"}]}, "budgets"), ({"train": {"seed": -1}}, "seed"),
    ({"holdout": "many"}, "holdout"), ({"mean": ["x"]}, "mean"), ({"std": [0.0]}, "std"),
    ({"classes": [1, 2]}, "classes"), ({"arch": "../x"}, "arch"), ({"holdout_indices_seed": 1.5}, "holdout_indices_seed"),
    ({"exit_macs": "lots"}, "exit_macs"),
])
def test_checkpoint_metadata_of_the_wrong_type_is_refused_on_read(tmp_path, meta, field):
    ck = _fm()
    p = tmp_path / "m.safetensors"
    write_checkpoint(p, ck.state, {**ck.meta, **meta})
    with pytest.raises(CheckpointError, match=field):
        read_checkpoint(p)


@pytest.mark.parametrize("change, field", [({"num_classes": "ten"}, "num_classes"), ({"stages": "x"}, "stages"),
                                           ({"img_size": -4}, "img_size"), ({"mean": [float("inf")]}, "mean")])
def test_spec_in_metadata_checked_field_by_field(tmp_path, change, field):
    ck = _fm()
    meta = dict(ck.meta)
    meta["spec"] = {**meta["spec"], **change}
    p = tmp_path / "s.safetensors"
    write_checkpoint(p, ck.state, meta)
    with pytest.raises(CheckpointError, match=field):
        read_checkpoint(p)
    refused(run(["predict", "--weights", p, _png(tmp_path / "a.png")], tmp_path), field)


# ---- bounded reading -------------------------------------------------------------------------------------

def test_deflate_bomb_pth_is_refused_before_unpacking(tmp_path):
    p = tmp_path / "bomb.pth"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr("archive/data/0", b"\0" * (500 << 20))
    assert p.stat().st_size < 2 << 20
    rss, proc = _peak_rss_mb(f"from dvt_core.checkpoint.files import read_checkpoint\n"
                             f"from dvt_core.errors import CheckpointError\n"
                             f"try:\n    read_checkpoint({str(p)!r})\nexcept CheckpointError as e:\n    print('REFUSED', e)")
    assert "REFUSED" in proc.stdout and "decompression bomb" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert rss < 450, rss  # torch imported, nothing unpacked


def test_million_tensor_files_are_refused_cheaply(tmp_path):
    n = MAX_TENSORS + 10
    ck = tmp_path / "many.ckpt"
    one = [ms_ckpt._entry(f"t{i}", [1], "Float32", b"\0\0\0\0") for i in range(n)]
    ck.write_bytes(b"".join(one))
    with pytest.raises(CheckpointError, match="tensors|entries"):
        read_checkpoint(ck)
    header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}
    raw = json.dumps(header).encode()
    st = tmp_path / "many.safetensors"
    st.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * n))
    with pytest.raises(CheckpointError, match="tensors"):
        read_checkpoint(st)


def test_safetensors_offsets_and_header_checked_first(tmp_path):
    p = tmp_path / "bad.safetensors"
    for header, needle in (({"w": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 4 << 30]}}, "data_offsets"),
                           ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "needs 8"),
                           ({"w": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, "shape")):
        raw = json.dumps(header).encode()
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
        with pytest.raises(CheckpointError, match=needle):
            read_checkpoint(p)
    p.write_bytes(struct.pack("<Q", 50_000_000) + b"{}")  # sniffed as safetensors, claims more than the file
    with pytest.raises(CheckpointError, match="header claims"):
        read_checkpoint(p)


def test_truncated_ckpt_is_an_error_not_a_signal(tmp_path):
    ck = _fm()
    full = tmp_path / "full.ckpt"
    write_checkpoint(full, ck.state, ck.meta)
    data = full.read_bytes()
    for cut in (len(data) // 3, len(data) - 5):
        p = tmp_path / f"cut{cut}.ckpt"
        p.write_bytes(data[:cut])
        refused(run(["predict", "--model", FM, "--weights", p, _png(tmp_path / "a.png")], tmp_path))


_SHRINKER = r"""
import os, sys, threading, time
from dvt_core.checkpoint import ms_ckpt
from dvt_core.errors import CheckpointError
path = sys.argv[1]
data = open(path, "rb").read()
for attempt in range(20):  # the file shrinks while it is read: an error each time, never SIGBUS
    open(path, "wb").write(data)
    t = threading.Thread(target=lambda: (time.sleep(0.0005 * attempt), os.truncate(path, len(data) // 2)))
    t.start()
    try:
        ms_ckpt.read_ckpt(path)
    except CheckpointError:
        pass
    t.join()
print("DONE")
"""


def test_ckpt_shrinking_while_read_never_kills_the_process(tmp_path):
    ck = _fm()
    p = write_checkpoint(tmp_path / "s.ckpt", ck.state, ck.meta)
    proc = subprocess.run([sys.executable, "-c", _SHRINKER, str(p)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0 and "DONE" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_fifo_weights_and_fifo_images_never_hang(tmp_path):
    fifo = tmp_path / "w.pth"
    os.mkfifo(fifo)
    refused(run(["predict", "--model", FM, "--weights", fifo, _png(tmp_path / "a.png")], tmp_path, timeout=60),
            "FIFO")
    folder = tmp_path / "imgs"
    folder.mkdir()
    os.mkfifo(folder / "b.png")
    _png(folder / "c.png")
    proc = run(["predict", "--model", FM, folder], tmp_path, timeout=60)
    assert proc.returncode == 1 and "FIFO" in proc.stderr and "c.png" in proc.stdout, proc.stderr[-2000:]
    with pytest.raises(DVTError, match="FIFO"):
        schema.read_bytes(fifo)


def test_images_decode_within_bounded_memory(tmp_path):
    from PIL import Image

    thin = tmp_path / "thin.png"
    Image.fromarray(np.zeros((1, 40_000_000), np.uint8), "L").save(thin)
    wide = tmp_path / "wide16.png"
    Image.fromarray(np.zeros((6000, 6000), np.uint16)).save(wide)
    assert thin.stat().st_size < 200_000 and Image.open(wide).mode.startswith("I;16")
    for p in (thin, wide):
        rss, proc = _peak_rss_mb(f"from dvt_core.data.images import read_image\n"
                                 f"print(read_image({str(p)!r}, 224, 1).shape)")
        assert "(224, 224)" in proc.stdout, proc.stderr[-2000:]
        assert rss < 400, (p.name, rss)


def test_phone_jpeg_is_accepted_and_decoded_small(tmp_path):
    from PIL import Image

    p = tmp_path / "phone.jpg"
    Image.new("RGB", (8000, 6000), (120, 30, 200)).save(p, quality=70)
    rss, proc = _peak_rss_mb(f"import dvt_core\nb = dvt_core.preprocess({str(p)!r}, 'dvt_deit_small')\n"
                             f"print(b.shape)")
    assert "(1, 3, 224, 224)" in proc.stdout, proc.stderr[-2000:]
    assert rss < 400, rss


def test_bomb_sized_png_is_refused_without_raw_warnings(tmp_path):
    from PIL import Image

    p = tmp_path / "huge.png"
    Image.new("1", (12000, 10000)).save(p)  # 120 Mpx header: above Pillow's warning level
    proc = run(["predict", "--model", FM, p], tmp_path)
    refused(proc, "none of the 1 image")
    assert "DecompressionBombWarning" not in proc.stderr and "RuntimeWarning" not in proc.stderr


def test_predict_with_nothing_readable_is_status_2_one_line(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not an image")
    (tmp_path / "y.jpg").write_bytes(b"\xff\xd8\xff nothing")
    refused(run(["predict", "--model", FM, tmp_path / "x.png", tmp_path / "y.jpg"], tmp_path), "none of the 2")


# ---- export folders are a trust boundary -------------------------------------------------------------------

@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    pytest.importorskip("onnx")
    from dvt_core.export.writer import export_model

    model = dvt_core.build("dvt_deit_small", backend="torch", **EXPORT_SMALL).eval()
    return export_model(model, "onnx", tmp_path_factory.mktemp("exp") / "deit")


def _copy(export_dir, tmp_path) -> Path:
    d = tmp_path / "e"
    shutil.copytree(export_dir, d)
    return d


def _edit(d: Path, fn) -> None:
    m = json.loads((d / "dvt.json").read_text())
    fn(m)
    (d / "dvt.json").write_text(json.dumps(m))


def _load(d):
    from dvt_core.export.manifest import read_manifest

    return read_manifest(d)


@pytest.mark.export
@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["stages"][0].update(file="/etc/passwd"), "outside"),
    (lambda m: m["stages"][0].update(file="../../stage1.onnx"), "outside"),
    (lambda m: m["stages"][1].update(sha256=12), "sha256"),
    (lambda m: m.update(stages=m["stages"][:2]), "stages"),
    (lambda m: m.update(stages="all"), "stages"),
    (lambda m: m.update(exit_macs=[0, 0, 0]), "exit_macs"),
    (lambda m: m.update(exit_macs=["a", 1, 2]), "exit_macs"),
    (lambda m: m.update(thresholds=[0.5]), "thresholds"),
    (lambda m: m.update(thresholds="high"), "thresholds"),
    (lambda m: m.update(batch_axes={"features": 7}), "batch_axes"),
    (lambda m: m.update(classes=["a", "b"]), "classes"),
    (lambda m: m.update(classes=[{"x": 1}] * 10), "classes"),
    (lambda m: m["spec"].update(num_classes="ten"), "num_classes"),
    (lambda m: m["stages"][0].update(inputs=["images", "prev_features"]), "inputs"),
    (lambda m: m.update(checkpoint_meta={"train": {"seed": "x"}}), "seed"),
])
def test_malformed_manifest_is_one_named_error(export_dir, tmp_path, edit, needle):
    d = _copy(export_dir, tmp_path)
    _edit(d, edit)
    with pytest.raises(DVTError, match=needle):
        _load(d)
    refused(run(["predict", "--backend", "onnx", "--weights", d, _png(tmp_path / "a.png", 32)], tmp_path,
                backend=None), needle)


@pytest.mark.export
def test_symlinked_graph_leaving_the_folder_is_refused(export_dir, tmp_path):
    d = _copy(export_dir, tmp_path)
    outside = tmp_path / "outside.onnx"
    shutil.move(d / "stage2.onnx", outside)
    os.symlink(outside, d / "stage2.onnx")
    with pytest.raises(ManifestError, match="outside"):
        _load(d)


@pytest.mark.export
def test_every_file_beside_the_graphs_is_covered_by_a_hash(export_dir, tmp_path):
    d = _copy(export_dir, tmp_path)
    (d / "stage1.onnx.data").write_bytes(b"\0" * 64)  # external data a graph could name
    with pytest.raises(ManifestError, match="not covered"):
        _load(d)
    (d / "stage1.onnx.data").unlink()
    _edit(d, lambda m: m.update(data_files=[{"file": "w.bin", "sha256": "0" * 64}]))
    (d / "w.bin").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="SHA-256 differs"):
        _load(d)


@pytest.mark.export
def test_oversized_and_deep_manifests_are_refused_unparsed(export_dir, tmp_path):
    d = _copy(export_dir, tmp_path)
    with open(d / "dvt.json", "wb") as fh:
        fh.truncate(100 << 20)  # sparse: 100 MB on paper
    with pytest.raises(ManifestError, match="refused above"):
        _load(d)
    (d / "dvt.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError, match="nests deeper"):
        _load(d)
    os.remove(d / "dvt.json")
    os.mkfifo(d / "dvt.json")
    with pytest.raises(ManifestError, match="FIFO"):
        _load(d)


# ---- outputs: inside what the user named, nothing silent, nothing left -----------------------------------------

@pytest.mark.export
def test_export_target_checks(tmp_path):
    w = ROOT / "weights" / "dvt_fashion_mnist.safetensors"
    refused(run(["export", FM, "--weights", w, "--format", "onnx", "--out", tmp_path / "no" / "such" / "e"],
                tmp_path), "does not exist")
    assert not (tmp_path / "no").exists()
    refused(run(["export", FM, "--weights", w, "--format", "onnx", "--out", "."], tmp_path), "exists")
    refused(run(["export", FM, "--weights", w, "--format", "onnx", "--out", ".", "--force"], tmp_path))
    refused(run(["export", FM, "--weights", w, "--format", "onnx", "--out", "e", "--opset", "9"], tmp_path), "opset")
    assert list(tmp_path.iterdir()) == []


def _fsize_limited(limit):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("dst", ["o.pth", "o.safetensors", "o.ckpt"])
def test_disk_full_during_convert_is_one_line_and_leaves_nothing(tmp_path, dst):
    w = ROOT / "weights" / "dvt_fashion_mnist.safetensors"
    proc = run(["convert", w, dst], tmp_path, preexec_fn=_fsize_limited(20_000))
    refused(proc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.export
def test_disk_full_during_export_is_one_line_and_leaves_nothing(tmp_path):
    w = ROOT / "weights" / "dvt_fashion_mnist.safetensors"
    refused(run(["export", FM, "--weights", w, "--format", "onnx", "--out", "e"], tmp_path,
                preexec_fn=_fsize_limited(20_000)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.export
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_export_removes_the_temp_folder_and_stale_ones_are_swept(tmp_path, sig):
    w = ROOT / "weights" / "dvt_fashion_mnist.safetensors"
    stale = tmp_path / ".e.dvt-tmp-999999999-deadbeef"
    (stale / "x").mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "dvt_core", "export", FM, "--weights", str(w), "--format", "onnx",
                             "--out", "e"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(tmp_path.glob(".e.dvt-tmp-*/stage1.onnx")):
        time.sleep(0.02)
    assert any(tmp_path.glob(".e.dvt-tmp-*/stage1.onnx")), "the export never started writing"
    assert not stale.exists()  # swept when the export began
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


# ---- the library makes the commands' checks -------------------------------------------------------------------

def test_weight_checks_live_in_the_library(tmp_path):
    from dvt_core.checkpoint import registry

    with pytest.raises(DVTError, match="not found"):
        registry.check_weights(FM, tmp_path / "missing.pth")
    with pytest.raises(DVTError, match="--sha256"):
        registry.check_weights(FM, "default", "0" * 64)
    p = tmp_path / "w.safetensors"
    p.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="SHA-256"):
        registry.check_weights(FM, p, "0" * 64)
    assert registry.is_shipped_file(ROOT / "weights" / "dvt_fashion_mnist.safetensors")
    assert not registry.is_shipped_file(p)
    assert registry.has_shipped_weights(FM) and not registry.has_shipped_weights("dvt_vit_base_nope")


@pytest.mark.export
def test_graph_naming_external_data_outside_the_folder_is_refused(export_dir, tmp_path):
    import hashlib

    import onnx
    from onnx import TensorProto

    d = _copy(export_dir, tmp_path)
    graph = onnx.load(str(d / "stage1.onnx"))
    tensor = max(graph.graph.initializer, key=lambda t: len(t.raw_data))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(len(tensor.raw_data)))
    size = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", str(size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(d / "stage1.onnx"))
    digest = hashlib.sha256((d / "stage1.onnx").read_bytes()).hexdigest()
    _edit(d, lambda m: m["stages"][0].update(sha256=digest))  # a hostile folder's hashes match its own files
    with pytest.raises(ManifestError, match="outside"):
        dvt_core.build(d, backend="onnx")


def test_out_of_range_weights_never_give_silent_predictions(tmp_path):
    ck = _fm()
    state = {k: (v * 1e30 if v.ndim == 2 else v) for k, v in ck.state.items()}  # finite, but overflow the logits
    p = write_checkpoint(tmp_path / "big.safetensors", state, ck.meta)
    proc = run(["predict", "--model", FM, "--weights", p, _png(tmp_path / "a.png")], tmp_path)
    refused(proc, "NaN or infinite logits")
    assert "RuntimeWarning" not in proc.stderr


def test_bfloat16_ckpt_loads_widened(tmp_path):
    import torch

    ck = _fm()
    from dvt_core.checkpoint.naming import canonical_to_mindspore

    bits = {k: torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in ck.state.items()}
    raw = b"".join(ms_ckpt._entry(canonical_to_mindspore(k), list(v.shape), "BFloat16", v.view(torch.int16).numpy()
                                  .tobytes()) for k, v in bits.items())
    raw += ms_ckpt._entry("dvt_meta", [0], "str", json.dumps(ck.meta).encode("utf-32-le"))
    p = tmp_path / "bf16.ckpt"
    p.write_bytes(raw)
    model = dvt_core.build(FM, weights=p)
    assert any("bfloat16 -> float32" in c for c in model.checkpoint_meta["load_casts"])
    k = sorted(bits)[7]
    assert np.array_equal(model.state_dict()[k].numpy(), bits[k].float().numpy())


def test_disk_full_during_calibrate_is_one_line_and_leaves_nothing(tmp_path):
    refused(run(["calibrate", "--model", FM, "--weights", "default", "--budget", "3M", "--limit", "200",
                 "--out", "o.safetensors"], tmp_path, preexec_fn=_fsize_limited(20_000)), "o.safetensors")
    assert list(tmp_path.iterdir()) == []
