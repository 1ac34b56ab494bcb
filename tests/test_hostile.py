"""Hostile files and racing writers: crafted inputs end with status 2 and one line, never a crash.

Every crafted file is made here. Commands run in subprocesses under an address-space limit
(``resource.setrlimit``), so a regression that allocates gigabytes fails instead of swapping.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dvt_core
from dvt_core import fileio
from dvt_core.checkpoint import ms_ckpt as ckpt_format
from dvt_core.checkpoint.files import read_checkpoint, write_checkpoint
from dvt_core.errors import CheckpointError, InputError

pytestmark = pytest.mark.hostile

from helpers import ROOT, refused, run  # noqa: E402,F401

SMALL = dict(depth=1, embed_dim=16, num_heads=2, token_dim=8)  # tiny T2T overrides


def _png(path, size=8):
    from PIL import Image

    Image.fromarray(np.full((size, size), 128, np.uint8), "L").save(path)
    return path


def _backends():
    # Both always: MindSpore is part of the test install, and a broken backend must fail, not vanish.
    return ["torch", pytest.param("mindspore", marks=pytest.mark.mindspore)]


BACKENDS = _backends()


# ---- crafted MindSpore .ckpt ---------------------------------------------------------------------

def _overflowing_ckpt(path, content_bytes=64):
    """One float32 of dims [1] whose tensor_content is ``content_bytes`` long (MindSpore's heap bug)."""
    raw = ckpt_format._entry("stages.0.head.bias", [1], "Float32", b"\x00" * content_bytes)
    Path(path).write_bytes(raw)
    return path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [64, 4096])
def test_overflowing_ckpt_is_refused_before_any_framework(tmp_path, backend, size):
    bad = _overflowing_ckpt(tmp_path / "bad.ckpt", size)
    assert bad.stat().st_size < size + 100
    line = refused(run(["predict", _png(tmp_path / "a.png"), "--weights", bad, "--model", "dvt_fashion_mnist"],
                       tmp_path, backend), "bad.ckpt", "stages.0.head.bias", f"holds {size} bytes")
    assert "need 4" in line


def test_ckpt_reader_checks_every_length(tmp_path):
    good = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(2.5)}
    raw = ckpt_format.encode_ckpt(good, {"dvt_meta": "{}"})
    (tmp_path / "ok.ckpt").write_bytes(raw)
    tensors, strings = ckpt_format.read_ckpt(tmp_path / "ok.ckpt")
    assert tensors["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and tensors["b"].shape == () and strings == {"dvt_meta": "{}"}
    for cut in (1, 5, len(raw) // 2, len(raw) - 1):  # every truncation is named, none crashes
        (tmp_path / "cut.ckpt").write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="cut.ckpt"):
            ckpt_format.read_ckpt(tmp_path / "cut.ckpt")
    huge = ckpt_format._entry("w", [1 << 10, 1 << 10], "Float32", b"\x00" * 16)
    (tmp_path / "huge.ckpt").write_bytes(huge)
    with pytest.raises(CheckpointError, match="holds 16 bytes"):
        ckpt_format.read_ckpt(tmp_path / "huge.ckpt")
    neg = ckpt_format._entry("w", [-1], "Float32", b"")
    (tmp_path / "neg.ckpt").write_bytes(neg)
    with pytest.raises(CheckpointError, match="negative"):
        ckpt_format.read_ckpt(tmp_path / "neg.ckpt")
    dup = ckpt_format.encode_ckpt({"w": np.zeros(2, np.float32)}) + ckpt_format.encode_ckpt({"v": np.zeros(1, np.float32)}) \
        + ckpt_format.encode_ckpt({"w": np.zeros(2, np.float32)})
    (tmp_path / "dup.ckpt").write_bytes(dup)
    with pytest.raises(CheckpointError, match="appears twice"):
        ckpt_format.read_ckpt(tmp_path / "dup.ckpt")


@pytest.mark.mindspore
def test_ckpt_written_here_is_what_mindspore_writes(tmp_path):
    ms = pytest.importorskip("mindspore")
    t = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "s": np.array(3.5, np.float32),
         "i": np.array([1, 2], np.int64)}
    ckpt_format.write_ckpt(tmp_path / "ours.ckpt", t, {"dvt_meta": '{"x": "\u00e9"}'})
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in t.items()], str(tmp_path / "theirs.ckpt"),
                       append_dict={"dvt_meta": '{"x": "\u00e9"}'})
    assert (tmp_path / "ours.ckpt").read_bytes() == (tmp_path / "theirs.ckpt").read_bytes()
    back = ms.load_checkpoint(str(tmp_path / "ours.ckpt"))
    assert back["a.weight"].asnumpy().tolist() == t["a.weight"].tolist() and back["dvt_meta"] == '{"x": "\u00e9"}'


# ---- small files that demand gigabytes ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_bomb_safetensors_is_refused_before_building(tmp_path, backend):
    from safetensors.numpy import save_file

    spec = dvt_core.get_spec("dvt_fashion_mnist").to_dict()
    spec["name"] = "bomb"
    for st in spec["stages"]:
        st.update(depth=64, embed_dim=4096, num_heads=64)
    bad = tmp_path / "bomb.safetensors"
    save_file({"stages.0.head.bias": np.zeros(10, np.float32)}, str(bad),
              metadata={"dvt": json.dumps({"arch": "bomb", "spec": spec})})
    assert bad.stat().st_size < 64_000
    line = refused(run(["predict", _png(tmp_path / "a.png"), "--weights", bad], tmp_path, backend), "bomb.safetensors")
    assert "missing" in line or "parameters" in line


def test_stride0_metadata_tensor_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    bad = tmp_path / "flops.pth"
    sd = {"w": torch.zeros(2)}
    torch.save({"model_state_dict": sd, "flops": torch.zeros(1).expand(65536, 65536)}, str(bad))
    assert bad.stat().st_size < 4000
    refused(run(["convert", bad, tmp_path / "o.safetensors", "--arch", "dvt_fashion_mnist"], tmp_path),
            "flops.pth", "metadata")


def test_zip_pickle_rescan_reads_one_capped_entry(tmp_path):
    import zipfile

    from dvt_core.checkpoint import files as checkpoints

    bad = tmp_path / "many.pth"
    with zipfile.ZipFile(bad, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        for i in range(4):
            zf.writestr(f"archive/x{i}.pkl", b"\x00" * (checkpoints.PICKLE_SCAN_MAX // 2))
    payloads = checkpoints._pickle_payloads(bad)
    assert payloads == [b"\x80\x02}q\x00."]


def test_folder_dataset_decodes_lazily(tmp_path):
    from PIL import Image

    from dvt_core.data.sources import ImageFolderDataset, load_image_folder

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (1200, 1200), np.uint8), "L").save(
                tmp_path / c / f"{i}.png")
    ds = ImageFolderDataset(tmp_path, img_size=28, channels=None)
    assert len(ds) == 6 and ds.channels == 1 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds[0].shape == (28, 28) and ds[1:3].shape == (2, 28, 28)
    x, y, names = load_image_folder(tmp_path, img_size=28)
    assert x.shape == (6, 28, 28) and names == ["a", "b"]


# ---- images ---------------------------------------------------------------------------------------

def test_eps_named_png_is_refused(tmp_path):
    from dvt_core.data.images import ImageReadError, read_image

    fake = tmp_path / "x.png"
    fake.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageReadError, match="x.png.*accepted format"):
        read_image(fake)
    assert isinstance(ImageReadError("x"), InputError)


def test_pixel_cap_refuses_before_decoding(tmp_path):
    from PIL import Image

    from dvt_core.data import images

    big = tmp_path / "big.png"
    Image.new("L", (9000, 5000)).save(big)  # 45 Mpx, a few KB on disk
    with pytest.raises(images.ImageReadError, match=r"big.png.*9000x5000.*refused"):
        images.read_image(big, 28, 1)


def test_exif_rotated_jpeg_is_read_upright(tmp_path):
    from PIL import Image

    from dvt_core.data.images import read_image

    a = np.zeros((40, 20), np.uint8)
    a[:, :10] = 255  # stored: left half white
    img = Image.fromarray(a, "L")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    up = read_image(tmp_path / "r.jpg")
    assert up.shape == (20, 40)  # viewed landscape
    assert up[:10].mean() > 200 and up[10:].mean() < 50  # the white half is on top once upright


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF"])
def test_preprocess_reads_every_allowed_format(tmp_path, fmt):
    from PIL import Image

    spec = dvt_core.get_spec("dvt_fashion_mnist")
    p = tmp_path / f"x.{fmt.lower()}"
    Image.fromarray(np.full((56, 56), 255, np.uint8), "L").save(p, format=fmt)
    x = dvt_core.preprocess([p, str(p)], spec)
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32
    expected = (1.0 - spec.mean[0]) / spec.std[0]
    assert np.allclose(x, expected, atol=0.05)


def test_preprocess_takes_arrays_and_pil_and_rgb(tmp_path):
    from PIL import Image

    spec = dvt_core.get_spec("dvt_fashion_mnist")
    rgb = np.zeros((30, 30, 3), np.uint8)
    rgb[..., 0] = 255
    a = dvt_core.preprocess(rgb, spec)
    b = dvt_core.preprocess(Image.fromarray(rgb), spec)
    assert a.shape == b.shape == (1, 1, 28, 28) and np.allclose(a, b)
    grey = round(0.299 * 255)  # ITU-R 601 luma of pure red
    assert np.allclose(a, (grey / 255 - spec.mean[0]) / spec.std[0], atol=1e-2)
    batch = dvt_core.preprocess(np.zeros((3, 28, 28), np.uint8), spec)
    assert batch.shape == (3, 1, 28, 28)
    with pytest.raises(InputError, match="uint8"):
        dvt_core.preprocess(np.zeros((28, 28), np.float32), spec)
    with pytest.raises(InputError, match="missing.png"):
        dvt_core.preprocess(tmp_path / "missing.png", spec)


# ---- honest loading ------------------------------------------------------------------------------

def _fm_state():
    from dvt_core.checkpoint.registry import default_weights_path

    return read_checkpoint(default_weights_path("dvt_fashion_mnist", verify=False))


def test_nan_weights_are_refused_with_the_name(tmp_path):
    ck = _fm_state()
    state = dict(ck.state)
    key = sorted(state)[3]
    state[key] = state[key].copy()
    state[key].flat[0] = np.nan
    p = write_checkpoint(tmp_path / "nan.safetensors", state, ck.meta)
    with pytest.raises(CheckpointError, match=f"{key}.*NaN"):
        dvt_core.build("dvt_fashion_mnist", weights=p)


def test_lossy_casts_are_refused_and_lossless_ones_listed(tmp_path):
    from dvt_core.checkpoint.files import CheckpointWarning

    ck = _fm_state()
    wide = {k: v.astype(np.float64) for k, v in ck.state.items()}
    p = write_checkpoint(tmp_path / "f64.safetensors", wide, ck.meta)
    with pytest.warns(CheckpointWarning, match="float64 -> float32"):
        dvt_core.build("dvt_fashion_mnist", weights=p)
    k = sorted(wide)[0]
    wide[k] = wide[k].copy()
    wide[k].flat[0] = 1e39  # beyond float32's range
    p2 = write_checkpoint(tmp_path / "f64b.safetensors", wide, ck.meta)
    with pytest.raises(CheckpointError, match="would change"):
        dvt_core.build("dvt_fashion_mnist", weights=p2)
    ints = dict(ck.state)
    ints[k] = np.zeros(ints[k].shape, np.int64)
    p3 = write_checkpoint(tmp_path / "int.safetensors", ints, ck.meta)
    with pytest.raises(CheckpointError, match="int64"):
        dvt_core.build("dvt_fashion_mnist", weights=p3)


def test_two_names_for_one_weight_are_refused(tmp_path):
    ck = _fm_state()
    state = {mindspore_name(k): v for k, v in ck.state.items()}
    ln = next(k for k in ck.state if k.endswith("norm.weight"))
    state[ln] = ck.state[ln]  # the torch spelling beside MindSpore's gamma
    ckpt_format.write_ckpt(tmp_path / "two.ckpt", state, {"dvt_meta": json.dumps(ck.meta)})
    with pytest.raises(CheckpointError, match="both name the weight"):
        read_checkpoint(tmp_path / "two.ckpt")


def mindspore_name(k):
    from dvt_core.checkpoint.naming import canonical_to_mindspore

    return canonical_to_mindspore(k)


def test_formats_from_content_and_suffix_contradictions(tmp_path):
    ck = _fm_state()
    p = write_checkpoint(tmp_path / "m.ckpt", ck.state, ck.meta)
    renamed = tmp_path / "m.bin"
    os.rename(p, renamed)
    back = read_checkpoint(renamed)
    assert back.format == "mindspore" and set(back.state) == set(ck.state)
    for name, fmt in (("b.pth", "mindspore"), ("b.safetensors", "torch"), ("b.ckpt", "safetensors")):
        with pytest.raises(CheckpointError, match="suffix says"):
            write_checkpoint(tmp_path / name, ck.state, ck.meta, fmt=fmt)
        assert not (tmp_path / name).exists()


# ---- writes --------------------------------------------------------------------------------------

def test_dangling_symlink_counts_as_existing(tmp_path):
    link = tmp_path / "out.json"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        fileio.write_text(link, "x")
    assert os.path.islink(link) and not (tmp_path / "nowhere").exists()


def test_replace_keeps_mode_and_leaves_no_temp(tmp_path):
    p = tmp_path / "secret.json"
    p.write_text("old")
    os.chmod(p, 0o600)
    with pytest.raises(FileExistsError):
        fileio.write_text(p, "new")
    fileio.write_text(p, "new", force=True)
    assert p.read_text() == "new" and (p.stat().st_mode & 0o777) == 0o600
    with pytest.raises(RuntimeError):
        with fileio.atomic_write(tmp_path / "half.bin") as tmp:
            tmp.write_bytes(b"x")
            raise RuntimeError("writer failed")
    assert sorted(os.listdir(tmp_path)) == ["secret.json"]


_RACER = """
import sys, time
import dvt_core.fileio as f
t0 = float(sys.argv[2])
with f.atomic_write(sys.argv[1]) as tmp:
    tmp.write_text(sys.argv[3])
    while time.time() < t0: time.sleep(0.001)
print("won")
"""


def test_racing_writers_exactly_one_wins(tmp_path):
    dst = tmp_path / "race.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(dst), str(start), f"writer{i}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    loser = next(o for p, o in zip(procs, outs) if p.returncode)
    assert "FileExistsError" in loser[1]
    winner = next(o for p, o in zip(procs, outs) if p.returncode == 0)
    assert "won" in winner[0] and dst.read_text() in ("writer0", "writer1")
    assert sorted(os.listdir(tmp_path)) == ["race.txt"]


_SLOW_WRITER = """
import sys, time
import dvt_core.fileio as f
with f.atomic_write(sys.argv[1]) as tmp:
    tmp.write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_temp_removed_on_signal_and_stale_swept(tmp_path, sig):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path / "big.bin")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = Path(p.stdout.readline().strip())
    assert tmp.exists() and fileio.TEMP_MARK in tmp.name
    p.send_signal(sig)
    p.wait(timeout=30)
    assert p.returncode != 0 and not tmp.exists() and not (tmp_path / "big.bin").exists()
    # a temp file of a process that was killed outright (pid gone) is swept by the next write
    stale = tmp_path / f".x.bin{fileio.TEMP_MARK}{p.pid}-0badcafe.bin"
    stale.write_bytes(b"left")
    fileio.write_text(tmp_path / "next.txt", "ok")
    assert not stale.exists()


def test_convert_refuses_existing_destination(tmp_path):
    ck = _fm_state()
    src = write_checkpoint(tmp_path / "s.safetensors", ck.state, ck.meta)
    dst = tmp_path / "d.safetensors"
    dst.symlink_to(tmp_path / "nowhere")
    refused(run(["convert", src, dst], tmp_path), "d.safetensors")
    refused(run(["convert", src, tmp_path / "b.pth", "--to", "mindspore"], tmp_path), "b.pth")


# ---- registry ------------------------------------------------------------------------------------

def test_registry_needs_sha256_and_stays_inside(tmp_path, monkeypatch):
    from dvt_core.checkpoint import registry as weights

    (tmp_path / "w.safetensors").write_bytes(b"x")
    (tmp_path.parent / "outside.safetensors").write_bytes(b"x")
    digest = weights.sha256(tmp_path / "w.safetensors")
    (tmp_path / "registry.yaml").write_text(
        "shipped:\n"
        "  nohash: {file: w.safetensors}\n"
        f"  escape: {{file: ../outside.safetensors, sha256: {digest}}}\n"
        f"  good: {{file: w.safetensors, sha256: {digest}}}\n")
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(tmp_path))
    weights._registry.cache_clear()
    try:
        with pytest.raises(CheckpointError, match="sha256 of 'nohash'"):
            weights.default_weights_path("nohash")
        with pytest.raises(CheckpointError, match="outside|leading out"):
            weights.default_weights_path("escape")
        assert weights.default_weights_path("good") == (tmp_path / "w.safetensors").resolve()
        weights.verify_sha256(tmp_path / "w.safetensors", digest)
        with pytest.raises(CheckpointError, match="not the expected"):
            weights.verify_sha256(tmp_path / "w.safetensors", "0" * 64)
    finally:
        weights._registry.cache_clear()


# ---- honest output and outputs that are never clobbered -------------------------------------------

def test_control_characters_are_escaped_in_text_output(tmp_path):
    ck = _fm_state()
    meta = dict(ck.meta)
    meta["classes"] = ["\x1b[31mred\x1b[0m"] + [f"c{i}" for i in range(1, 10)]
    w = write_checkpoint(tmp_path / "w.safetensors", ck.state, meta)
    img = _png(tmp_path / "a\nforged line.png")
    proc = run(["predict", img, "--weights", w, "--thresholds", "0,0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\x1b" not in proc.stdout and len(proc.stdout.strip().splitlines()) == 1
    assert "a\\x0aforged line.png" in proc.stdout


def test_outputs_refuse_overwrite_without_force(tmp_path):
    existing = tmp_path / "out.png"
    existing.write_text("keep")
    from dvt_core.cli import plots
    from dvt_core.cli.commands._shared import emit_json

    with pytest.raises(FileExistsError):
        plots.accuracy_macs_plot(existing, "m", [1], [50])
    with pytest.raises(FileExistsError):
        emit_json({"a": 1}, str(existing))
    with pytest.raises(InputError, match="x.gif"):
        plots.accuracy_macs_plot(tmp_path / "x.gif", "m", [1], [50])
    plots.accuracy_macs_plot(tmp_path / "p.jpg", "m", [1], [50])
    assert (tmp_path / "p.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert existing.read_text() == "keep"


def test_sha256_option_checks_an_explicit_file(tmp_path):
    ck = _fm_state()
    w = write_checkpoint(tmp_path / "w.safetensors", ck.state, ck.meta)
    img = _png(tmp_path / "a.png")
    refused(run(["predict", img, "--weights", w, "--sha256", "0" * 64], tmp_path), "w.safetensors", "SHA-256")
    from dvt_core.checkpoint.registry import sha256

    ok = run(["predict", img, "--weights", w, "--sha256", sha256(w), "--thresholds", "0,0"], tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
