"""Tests of the framework-agnostic data layer (dvt_core.data.sources): IDX parsing, Fashion-MNIST loading,
image folders, normalisation, hold-out splits, augmentation and batching.

Everything runs on tiny files written into tmp_path; the one test that needs the real Fashion-MNIST
(Debian package dataset-fashion-mnist) skips when it is not installed.
"""
from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dvt_core.data import sources as data
from dvt_core.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B, np.dtype("i4"): 0x0C,
          np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr)
    header = bytes([0, 0, _CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr, compress=None) -> str:
    raw = idx_bytes(arr)
    path = str(path)
    if compress is None:
        compress = path.endswith(".gz")
    with open(path, "wb") as fh:
        fh.write(gzip.compress(raw) if compress else raw)
    return path


def fake_fashion(root, n_train=30, n_test=20, gz=True, seed=0):
    """A Fashion-MNIST-shaped folder with n images per split, every class present."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte{ext}"), x)
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte{ext}"), y)
        out[split] = (x, y)
    return out


# ------------------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_read_idx_roundtrip(tmp_path, dtype, name):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    got = data.read_idx(write_idx(tmp_path / name, arr))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    assert got.shape == (3, 4, 5)
    np.testing.assert_array_equal(got, arr)
    got[0, 0, 0] = 0  # a writable copy, not a view of the file bytes


def test_read_idx_gzip_detected_by_content(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "plain_name", arr, compress=True)), arr)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "x.gz", arr, compress=False)), arr)


def test_read_idx_one_dim_and_empty(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "l", labels)), labels)
    empty = np.zeros((0, 28, 28), dtype=np.uint8)
    assert data.read_idx(write_idx(tmp_path / "e", empty)).shape == (0, 28, 28)


def _bad(tmp_path, name, payload, gz=False):
    p = tmp_path / name
    p.write_bytes(gzip.compress(payload) if gz else payload)
    return str(p)


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("payload, problem", [
    (GOOD[:-1], "truncated IDX data"),
    (GOOD[:10], "truncated IDX header"),
    (GOOD[:3], "truncated IDX file"),
    (b"", "truncated IDX file"),
    (GOOD + b"\x00", "trailing bytes"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 32, "not an IDX file"),
    (b"\x00\x00\x07\x01" + b"\x00\x00\x00\x01" + b"\x00", "unknown type code"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
], ids=["data", "header", "magic", "empty", "trailing", "png", "typecode", "ndim0"])
def test_read_idx_rejects_bad_files(tmp_path, payload, problem, gz):
    path = _bad(tmp_path, "bad-idx" + (".gz" if gz else ""), payload, gz)
    with pytest.raises(DataError, match=problem) as exc:
        data.read_idx(path)
    assert path in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_read_idx_truncated_gzip(tmp_path):
    blob = gzip.compress(GOOD * 50)
    path = _bad(tmp_path, "cut.gz", blob[: len(blob) // 2])
    with pytest.raises(DataError, match="gzip") as exc:
        data.read_idx(path)
    assert path in str(exc.value)


def test_read_idx_missing_file(tmp_path):
    path = str(tmp_path / "nope.idx")
    with pytest.raises(DataError, match="cannot read") as exc:
        data.read_idx(path)
    assert path in str(exc.value)


# ---------------------------------------------------------------------------------- Fashion-MNIST


def test_class_names():
    assert data.FASHION_MNIST_CLASSES == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    assert data.FASHION_MNIST_DIR == "/usr/share/datasets/fashion-mnist"


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_from_root(tmp_path, gz):
    ref = fake_fashion(tmp_path / "fm", gz=gz)
    for split in ("train", "test"):
        x, y = data.load_fashion_mnist(split, root=tmp_path / "fm")
        assert x.dtype == np.uint8 and x.shape == ref[split][0].shape
        assert y.dtype == np.int64
        np.testing.assert_array_equal(x, ref[split][0])
        np.testing.assert_array_equal(y, ref[split][1])


def test_load_fashion_mnist_env_var(tmp_path, monkeypatch):
    ref = fake_fashion(tmp_path / "env")
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path / "env"))
    assert data.fashion_mnist_root() == str(tmp_path / "env")
    x, _ = data.load_fashion_mnist("test")
    np.testing.assert_array_equal(x, ref["test"][0])


def test_missing_dir_names_package(tmp_path, monkeypatch):
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path / "absent"))
    with pytest.raises(DataError) as exc:
        data.load_fashion_mnist("train")
    msg = str(exc.value)
    assert "install it with: apt-get install dataset-fashion-mnist" in msg
    assert "DVT_FASHION_MNIST" in msg
    assert str(tmp_path / "absent") in msg


def test_missing_file_names_package(tmp_path):
    fake_fashion(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    data.load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as exc:
        data.load_fashion_mnist("test", root=tmp_path)
    assert "t10k-labels-idx1-ubyte" in str(exc.value)


def test_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        data.load_fashion_mnist("valid", root=tmp_path)


@pytest.mark.parametrize("case, match", [
    ("shape", "28, 28"),
    ("count", "labels"),
    ("range", "out of range"),
    ("labeldim", "1-D"),
])
def test_load_fashion_mnist_rejects_wrong_content(tmp_path, case, match):
    fake_fashion(tmp_path)
    img = tmp_path / "train-images-idx3-ubyte.gz"
    lbl = tmp_path / "train-labels-idx1-ubyte.gz"
    if case == "shape":
        write_idx(img, np.zeros((30, 32, 32), dtype=np.uint8))
    elif case == "count":
        write_idx(lbl, np.zeros(29, dtype=np.uint8))
    elif case == "range":
        write_idx(lbl, np.full(30, 10, dtype=np.uint8))
    else:
        write_idx(lbl, np.zeros((30, 1), dtype=np.uint8))
    with pytest.raises(DataError, match=match):
        data.load_fashion_mnist("train", root=tmp_path)


def test_subset_indices_balanced_and_deterministic():
    labels = np.repeat(np.arange(4), 10)
    np.random.default_rng(0).shuffle(labels)
    a = data.subset_indices(labels, 3, seed=7)
    b = data.subset_indices(labels, 3, seed=7)
    c = data.subset_indices(labels, 3, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.int64 and len(set(a.tolist())) == 12
    np.testing.assert_array_equal(labels[a], np.repeat(np.arange(4), 3))
    with pytest.raises(DataError, match="fewer"):
        data.subset_indices(labels, 11, seed=0)


def test_sample_subset(tmp_path):
    ref = fake_fashion(tmp_path, n_test=40)
    x, y = data.sample_subset("test", 2, seed=3, root=tmp_path)
    x2, y2 = data.sample_subset("test", 2, seed=3, root=tmp_path)
    assert x.shape == (20, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(y, np.repeat(np.arange(10), 2))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    # every picked image is one of the split's images with the same label
    for img, lab in zip(x, y):
        hits = np.flatnonzero((ref["test"][0] == img).all(axis=(1, 2)))
        assert len(hits) == 1 and ref["test"][1][hits[0]] == lab


REAL = os.path.isfile(os.path.join(data.fashion_mnist_root(), "train-labels-idx1-ubyte.gz")) or \
    os.path.isfile(os.path.join(data.fashion_mnist_root(), "train-labels-idx1-ubyte"))


@pytest.mark.dataset
@pytest.mark.skipif(not REAL, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = data.load_fashion_mnist(split)
        assert x.shape == (n, 28, 28) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        assert y.min() == 0 and y.max() == 9
        np.testing.assert_array_equal(np.bincount(y), np.full(10, n // 10))
    xs, ys = data.sample_subset("test", 1, seed=0)
    assert xs.shape == (10, 28, 28)
    np.testing.assert_array_equal(ys, np.arange(10))


def test_module_imports_no_framework():
    code = ("import sys, dvt_core.data.sources; "
            "bad = [m for m in ('torch', 'mindspore') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ----------------------------------------------------------------------------------- image files


def _gray(h, w, value):
    return Image.fromarray(np.full((h, w), value, dtype=np.uint8), "L")


def _rgb(h, w, rgb):
    return Image.fromarray(np.full((h, w, 3), rgb, dtype=np.uint8), "RGB")


def make_folder(root, rgb_jpeg=True):
    (root / "boot").mkdir(parents=True)
    (root / "bag").mkdir()
    _gray(8, 8, 10).save(root / "boot" / "b1.png")
    _gray(8, 8, 20).save(root / "boot" / "b0.PNG")
    if rgb_jpeg:
        _rgb(8, 8, (200, 0, 0)).save(root / "bag" / "a0.jpg", quality=95)
    else:
        _gray(8, 8, 200).save(root / "bag" / "a0.jpeg", quality=95)
    (root / "bag" / "notes.txt").write_text("not an image")
    _gray(8, 8, 0).save(root / "bag" / ".hidden.png")
    (root / ".cache").mkdir()


def test_image_folder_happy_path(tmp_path):
    make_folder(tmp_path)
    x, y, names = data.load_image_folder(tmp_path)
    assert names == ["bag", "boot"]
    np.testing.assert_array_equal(y, [0, 1, 1])
    assert y.dtype == np.int64
    assert x.shape == (3, 8, 8, 3) and x.dtype == np.uint8  # a colour file makes the set RGB
    assert abs(int(x[0, 4, 4, 0]) - 200) <= 3 and x[0, 4, 4, 1] <= 3
    np.testing.assert_array_equal(x[1], 20)  # boot/b0.PNG sorts before boot/b1.png
    np.testing.assert_array_equal(x[2], 10)

    g, _, _ = data.load_image_folder(tmp_path, img_size=5, channels=1)
    assert g.shape == (3, 5, 5)
    np.testing.assert_array_equal(g[1], 20)


def test_image_folder_all_gray_is_one_channel(tmp_path):
    make_folder(tmp_path, rgb_jpeg=False)
    x, y, _ = data.load_image_folder(tmp_path, img_size=4)
    assert x.shape == (3, 4, 4)
    x3, _, _ = data.load_image_folder(tmp_path, channels=3)
    assert x3.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(x3[1, ..., 0], x3[1, ..., 2])


def test_image_folder_missing(tmp_path):
    with pytest.raises(DataError, match="does not exist") as exc:
        data.load_image_folder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(exc.value)
    f = tmp_path / "file.png"
    _gray(4, 4, 1).save(f)
    with pytest.raises(DataError, match="not a directory"):
        data.load_image_folder(f)


def test_image_folder_no_classes(tmp_path):
    _gray(4, 4, 1).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        data.load_image_folder(tmp_path)


def test_image_folder_empty_class(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "coat").mkdir()
    (tmp_path / "coat" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="holds no images") as exc:
        data.load_image_folder(tmp_path)
    assert str(tmp_path / "coat") in str(exc.value)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_image_folder_unreadable_image(tmp_path, kind):
    make_folder(tmp_path)
    bad = tmp_path / "boot" / "broken.png"
    if kind == "garbage":
        bad.write_bytes(b"this is not a png at all")
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match="unreadable image") as exc:
        data.load_image_folder(tmp_path)
    assert str(bad) in str(exc.value)


def test_image_folder_mixed_sizes(tmp_path):
    make_folder(tmp_path)
    _gray(9, 8, 5).save(tmp_path / "boot" / "b2.png")
    with pytest.raises(DataError, match="img_size") as exc:
        data.load_image_folder(tmp_path)
    assert "b2.png" in str(exc.value)
    x, _, _ = data.load_image_folder(tmp_path, img_size=8)
    assert x.shape == (4, 8, 8, 3)


def test_load_image_modes_and_resize(tmp_path):
    _rgb(6, 10, (10, 20, 30)).save(tmp_path / "c.png")
    a = data.load_image(tmp_path / "c.png", None, None)
    assert a.shape == (6, 10, 3)
    np.testing.assert_array_equal(a[0, 0], [10, 20, 30])
    g = data.load_image(tmp_path / "c.png", 4, 1)
    assert g.shape == (4, 4) and g.dtype == np.uint8
    # ITU-R 601 luma of (10, 20, 30)
    assert abs(int(g[0, 0]) - round(10 * 0.299 + 20 * 0.587 + 30 * 0.114)) <= 1

    # bilinear: a left-to-right ramp stays monotonic and keeps its range when downsized
    ramp = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    Image.fromarray(ramp, "L").save(tmp_path / "ramp.png")
    r = data.load_image(tmp_path / "ramp.png", 8, 1)
    assert r.shape == (8, 8)
    assert np.all(np.diff(r[4].astype(int)) > 0)
    assert len(np.unique(r[4])) == 8  # interpolated, not copied from 2 of the source columns


def test_load_image_transparency_and_16bit(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[:2, :, 3] = 255  # top half opaque white, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    a = data.load_image(tmp_path / "t.png", None, 1)
    np.testing.assert_array_equal(a[:2], 255)
    np.testing.assert_array_equal(a[2:], 0)

    wide = np.full((4, 4), 65535, dtype=np.uint16)
    wide[0] = 0
    Image.fromarray(wide).save(tmp_path / "w.png")
    w = data.load_image(tmp_path / "w.png", None, None)
    assert w.shape == (4, 4)
    np.testing.assert_array_equal(w[0], 0)
    np.testing.assert_array_equal(w[1:], 255)


def test_load_image_errors(tmp_path):
    with pytest.raises(DataError, match="not found") as exc:
        data.load_image(tmp_path / "x.png", 8, 1)
    assert "x.png" in str(exc.value)
    (tmp_path / "y.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="y.jpg"):
        data.load_image(tmp_path / "y.jpg", 8, 1)
    _gray(4, 4, 1).save(tmp_path / "z.png")
    with pytest.raises(ValueError, match="channels"):
        data.load_image(tmp_path / "z.png", 4, 2)


# ------------------------------------------------------------------------------ arrays and batches


def test_normalize_gray():
    x = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)  # (1, 2, 2)
    out = data.normalize(x, 0.5, 0.25)
    assert out.shape == (1, 1, 2, 2) and out.dtype == np.float32
    expected = (x.astype(np.float64) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(out[:, 0], expected, rtol=1e-6, atol=1e-6)
    assert out.flags["C_CONTIGUOUS"]


def test_normalize_per_channel():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(3, 4, 5, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = data.normalize(x, mean, std)
    assert out.shape == (3, 3, 4, 5)
    for c in range(3):
        ref = (x[..., c].astype(np.float64) / 255 - mean[c]) / std[c]
        np.testing.assert_allclose(out[:, c], ref, rtol=1e-5, atol=1e-5)
    one = data.normalize(x[..., :1], [0.2], [0.5])
    np.testing.assert_allclose(one, data.normalize(x[..., 0], 0.2, 0.5))


@pytest.mark.parametrize("x, mean, std, match", [
    (np.zeros((1, 2, 2), np.float32), 0.5, 0.5, "uint8"),
    (np.zeros((2, 2), np.uint8), 0.5, 0.5, "shape"),
    (np.zeros((1, 2, 2, 3), np.uint8), (0.5, 0.5), 0.5, "mean"),
    (np.zeros((1, 2, 2, 3), np.uint8), 0.5, (1, 1, 0), "positive"),
])
def test_normalize_errors(x, mean, std, match):
    with pytest.raises(ValueError, match=match):
        data.normalize(x, mean, std)


def test_split_holdout():
    tr, ho = data.split_holdout(100, 10, seed=0)
    tr2, ho2 = data.split_holdout(100, 10, seed=0)
    _, ho3 = data.split_holdout(100, 10, seed=1)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(ho, ho2)
    assert not np.array_equal(ho, ho3)
    assert len(tr) == 90 and len(ho) == 10 and tr.dtype == np.int64
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, ho])), np.arange(100))
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(ho) > 0)
    _, hf = data.split_holdout(50, 0.2, seed=0)
    assert len(hf) == 10
    tr0, ho0 = data.split_holdout(5, 0, seed=0)
    assert len(ho0) == 0 and len(tr0) == 5
    for bad in (101, -1, 1.0, -0.1):
        with pytest.raises(ValueError):
            data.split_holdout(100, bad, seed=0)


def _windows(img, pad):
    """All crops of the zero-padded image, and their mirrors."""
    p = np.pad(img, [(pad, pad), (pad, pad)] + [(0, 0)] * (img.ndim - 2))
    h, w = img.shape[:2]
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            win = p[dy:dy + h, dx:dx + w]
            out += [win, win[:, ::-1]]
    return out


@pytest.mark.parametrize("shape", [(16, 6, 7), (8, 6, 7, 3)])
def test_augment_shape_determinism_and_content(shape):
    batch = np.random.default_rng(0).integers(1, 256, size=shape, dtype=np.uint8)
    keep = batch.copy()
    a = data.augment(batch, np.random.default_rng(42), pad=2)
    b = data.augment(batch, np.random.default_rng(42), pad=2)
    c = data.augment(batch, np.random.default_rng(43), pad=2)
    assert a.shape == batch.shape and a.dtype == batch.dtype
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(batch, keep)  # the input is left alone
    for src, out in zip(batch, a):
        assert any(np.array_equal(out, win) for win in _windows(src, 2))


def test_augment_flip_only_and_identity():
    batch = np.random.default_rng(0).integers(0, 256, size=(64, 5, 5), dtype=np.uint8)
    np.testing.assert_array_equal(data.augment(batch, np.random.default_rng(0), pad=0, flip=False), batch)
    f = data.augment(batch, np.random.default_rng(0), pad=0, flip=True)
    flipped = np.array([np.array_equal(o, s[:, ::-1]) for o, s in zip(f, batch)])
    same = np.array([np.array_equal(o, s) for o, s in zip(f, batch)])
    assert np.all(flipped | same)
    assert 10 < flipped.sum() < 54
    shifted = data.augment(batch, np.random.default_rng(0), pad=3, flip=False)
    assert any(not np.array_equal(o, s) for o, s in zip(shifted, batch))
    with pytest.raises(ValueError):
        data.augment(batch, np.random.default_rng(0), pad=-1)
    with pytest.raises(ValueError):
        data.augment(batch[0], np.random.default_rng(0))


def test_iterate_batches():
    x = np.arange(10)[:, None] * np.ones((1, 3), dtype=np.int64)
    y = np.arange(10)
    batches = list(data.iterate_batches(x, y, 4, shuffle=False))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    assert [len(b[1]) for b in data.iterate_batches(x, y, 4, False, drop_last=True)] == [4, 4]

    s1 = [b[1] for b in data.iterate_batches(x, y, 3, True, np.random.default_rng(5))]
    s2 = [b[1] for b in data.iterate_batches(x, y, 3, True, np.random.default_rng(5))]
    for a, b in zip(s1, s2):
        np.testing.assert_array_equal(a, b)
    order = np.concatenate(s1)
    assert sorted(order.tolist()) == list(range(10)) and not np.array_equal(order, y)
    for xb, yb in data.iterate_batches(x, y, 3, True, np.random.default_rng(5)):
        np.testing.assert_array_equal(xb[:, 0], yb)  # images and labels stay paired

    with pytest.raises(ValueError, match="rng"):
        list(data.iterate_batches(x, y, 3, shuffle=True))
    with pytest.raises(ValueError, match="labels"):
        list(data.iterate_batches(x, y[:5], 3, shuffle=False))
    with pytest.raises(ValueError, match="batch_size"):
        list(data.iterate_batches(x, y, 0, shuffle=False))
