"""Framework-agnostic data layer: Fashion-MNIST, image folders, normalisation, augmentation, batching.

Everything here works on numpy arrays (and Pillow for image files) so that the PyTorch and MindSpore
backends see exactly the same pixels, the same augmentation draws and the same batch order; a
backend only converts the final float32 arrays to its own tensors. Randomness always comes from an
explicit ``numpy.random.Generator`` (or an integer seed), so a run is reproducible from its seed.

Fashion-MNIST is read from the IDX files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``, or the folder named by ``$DVT_FASHION_MNIST``); nothing is
ever downloaded at run time.
"""
from __future__ import annotations

import gzip
import os
import sys
import zlib
from typing import Iterator, Optional, Union

import numpy as np

from dvt_core.data.images import ImageReadError, normalize, peek_is_gray, read_image  # noqa: F401  (normalize: also here)
from dvt_core.errors import ArgumentError, DataError, UnreadableImagesError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "DVT_FASHION_MNIST"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_SIZE = 28
FASHION_MNIST_COUNTS = {"train": 60000, "test": 10000}
# File-name prefix of each split, as published (and as the Debian package installs them).
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}

# Names of the image files a folder data set lists; the format itself is read from the content.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# IDX type codes (third byte of the magic number) and their big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------------------------- IDX


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Parse an IDX file (plain or gzip-compressed) into a numpy array in native byte order.

    The IDX header is two zero bytes, a type code, the number of dimensions and one big-endian
    uint32 per dimension; the data follows, big-endian, with exactly ``prod(dims)`` items.
    Compression is detected from the content, not the file name. Anything that does not match
    (wrong magic, unknown type code, truncated header or data, trailing bytes, broken gzip stream)
    raises :class:`DataError` naming the file, so a corrupt download is never silently half-read.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc.strerror or exc})") from exc

    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc

    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file: {len(raw)} bytes, the header alone needs 4")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(
            f"{path}: not an IDX file: magic number starts with {raw[:2].hex()}, expected 0000"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(
            f"{path}: not an IDX file: unknown type code 0x{code:02x} "
            f"(known: {', '.join(f'0x{c:02x}' for c in sorted(_IDX_DTYPES))})"
        )
    if ndim == 0:
        raise DataError(f"{path}: not an IDX file: header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, file has {len(raw)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found < expected:
        raise DataError(
            f"{path}: truncated IDX data: shape {dims} of {dtype.name} needs {expected} bytes, "
            f"file has {found}"
        )
    if found > expected:
        raise DataError(
            f"{path}: IDX size mismatch: shape {dims} of {dtype.name} needs {expected} bytes, "
            f"file has {found - expected} trailing bytes"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return arr.reshape(dims).astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist_root(root: Optional[Union[str, os.PathLike]] = None) -> str:
    """The Fashion-MNIST folder in use: ``root`` if given, else ``$DVT_FASHION_MNIST``, else the default."""
    if root is not None:
        return os.fspath(root)
    return os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR


def _missing_message(what: str) -> str:
    return (
        f"{what}. Fashion-MNIST is not installed there; install it with: "
        f"apt-get install {FASHION_MNIST_PACKAGE} (files go to {FASHION_MNIST_DIR}), "
        f"or point ${FASHION_MNIST_ENV} at a folder holding train-images-idx3-ubyte[.gz], "
        f"train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]"
    )


def _find_idx(root: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise DataError(_missing_message(f"{os.path.join(root, stem)}[.gz] not found"))


def load_fashion_mnist(
    split: str = "train", root: Optional[Union[str, os.PathLike]] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load one Fashion-MNIST split as ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    ``split`` is ``"train"`` (60000 images) or ``"test"`` (10000). Files are looked up in ``root``,
    else ``$DVT_FASHION_MNIST``, else :data:`FASHION_MNIST_DIR`; plain and ``.gz`` names both work.
    A missing folder or file raises :class:`DataError` saying which Debian package provides it; files
    that parse but do not look like Fashion-MNIST (wrong shape, counts or labels) raise too.
    """
    if split not in _SPLIT_PREFIX:
        raise ArgumentError(f"split must be one of {sorted(_SPLIT_PREFIX)}, got {split!r}")
    folder = fashion_mnist_root(root)
    if not os.path.isdir(folder):
        raise DataError(_missing_message(f"Fashion-MNIST folder {folder} does not exist"))
    prefix = _SPLIT_PREFIX[split]
    img_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (FASHION_MNIST_SIZE,) * 2:
        raise DataError(
            f"{img_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{lbl_path}: expected a 1-D uint8 label file, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise DataError(
            f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(
            f"{lbl_path}: label {int(labels.max())} out of range 0..{len(FASHION_MNIST_CLASSES) - 1}"
        )
    return images, labels.astype(np.int64)


def subset_indices(labels: np.ndarray, n_per_class: int, seed: int,
                   num_classes: Optional[int] = None) -> np.ndarray:
    """Indices of ``n_per_class`` examples of every class, drawn without replacement from ``seed``.

    The result is class-major (all of class 0, then class 1, ...) with ascending indices inside a
    class, so the same seed always yields the same, readable order. A class with too few examples
    raises :class:`DataError`.
    """
    labels = np.asarray(labels)
    if n_per_class < 1:
        raise ArgumentError(f"n_per_class must be >= 1, got {n_per_class}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < n_per_class:
            raise DataError(f"class {c} has {len(members)} examples, fewer than n_per_class={n_per_class}")
        picks.append(np.sort(rng.choice(members, size=n_per_class, replace=False)))
    if not picks:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(picks).astype(np.int64)


def sample_subset(
    split: str, n_per_class: int, seed: int, root: Optional[Union[str, os.PathLike]] = None
) -> tuple[np.ndarray, np.ndarray]:
    """A small balanced Fashion-MNIST subset ``(images uint8 (10*n, 28, 28), labels int64)``.

    Deterministic in ``(split, n_per_class, seed)``: meant for sample images shipped with the
    project and for quick smoke runs. The order is class-major; see :func:`subset_indices`.
    """
    images, labels = load_fashion_mnist(split, root=root)
    idx = subset_indices(labels, n_per_class, seed, num_classes=len(FASHION_MNIST_CLASSES))
    return images[idx], labels[idx]


# ----------------------------------------------------------------------------------- image files


def load_image(
    path: Union[str, os.PathLike], img_size: Optional[int] = None, channels: Optional[int] = None
) -> np.ndarray:
    """Read one image file as uint8: ``(H, W)`` for ``channels=1``, ``(H, W, 3)`` for ``channels=3``.

    Formats: PNG, JPEG, BMP, WebP, GIF, TIFF, recognised from the content (dvt_core.data.images); the
    EXIF orientation is applied. The image is converted to grayscale or RGB (transparent pixels go
    over black) and resized bilinearly to ``img_size x img_size`` when ``img_size`` is given (large
    images are decoded reduced). ``channels=None`` keeps a grayscale file grayscale and turns
    anything else into RGB. An unreadable, refused or missing file raises
    :class:`dvt_core.data.images.ImageReadError` (a :class:`DataError`) naming it.
    """
    return read_image(os.fspath(path), img_size, channels)


def _list_images(folder: str) -> list[str]:
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if not f.startswith(".")
        and f.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, f))
    )


def image_folder_files(root: Union[str, os.PathLike]) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(file, label), ...], class_names)`` of a classification folder, nothing decoded."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"image folder {root} does not exist or is not a directory")
    class_names = sorted(
        d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
    )
    if not class_names:
        raise DataError(
            f"image folder {root} has no class sub-folders (expected {root}/<class>/<image>.png)"
        )
    files: list[tuple[str, int]] = []
    for label, name in enumerate(class_names):
        found = _list_images(os.path.join(root, name))
        if not found:
            raise DataError(
                f"class folder {os.path.join(root, name)} holds no images (PNG/JPEG/BMP/WebP/GIF/TIFF: "
                f"{', '.join(IMAGE_EXTENSIONS)})"
            )
        files.extend((f, label) for f in found)
    return files, class_names


def _reason(exc: Exception, path: str) -> str:
    """``path: reason`` from an image error (whose message usually starts with the path already)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if text.startswith(path) else f"{path}: {text}"


class ImageFolderDataset:
    """A classification folder decoded lazily: ``ds[i]`` reads file ``i`` at ``img_size`` only then.

    ``len(ds)``, ``ds.labels`` (int64), ``ds.class_names``, ``ds.files``; ``ds[i]`` is a uint8 image,
    ``ds[a:b]`` / ``ds[index_array]`` a stacked batch. No decoded image is kept.

    Every file's header is read when the data set is made: files that cannot be read are all named at
    once, in :class:`UnreadableImagesError` (``unreadable="raise"``) or in ``ds.skipped`` (``"skip"``:
    they are left out, the rest is numbered as if they were not there).
    """

    def __init__(self, root, img_size: Optional[int] = None, channels: Optional[int] = None,
                 unreadable: str = "raise"):
        if unreadable not in ("raise", "skip"):
            raise ArgumentError(f"unreadable must be 'raise' or 'skip', got {unreadable!r}")
        pairs, self.class_names = image_folder_files(root)
        # Every header is read once, here, so that all unreadable files are known in one pass.
        gray, self.skipped = [], []
        kept = []
        for f, label in pairs:
            try:
                gray.append(peek_is_gray(f))
                kept.append((f, label))
            except ImageReadError as exc:
                self.skipped.append(_reason(exc, f))
        if self.skipped and unreadable == "raise":
            raise UnreadableImagesError(os.fspath(root), self.skipped)
        if not kept:
            raise DataError(f"image folder {os.fspath(root)}: none of its {len(pairs)} image files can be read "
                            f"(e.g. {self.skipped[0]})")
        self.files = [f for f, _ in kept]
        self.labels = np.array([label for _, label in kept], dtype=np.int64)
        self.img_size = img_size
        if channels is None:  # from the headers alone
            channels = 1 if all(gray) else 3
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def _one(self, i: int) -> np.ndarray:
        return read_image(self.files[i], self.img_size, self.channels)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self._one(int(index))
        idx = np.arange(len(self))[index]
        return np.stack([self._one(int(i)) for i in idx]) if len(idx) else np.zeros((0,), np.uint8)


def load_image_folder(
    root: Union[str, os.PathLike], img_size: Optional[int] = None, channels: Optional[int] = None,
    unreadable: str = "raise", skipped: Optional[list] = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load a classification folder: one sub-folder per class, image files inside.

    Returns ``(images, labels int64 (N,), class_names)`` where class ``i`` is the ``i``-th sub-folder
    name in sorted order, and images are uint8 ``(N, H, W)`` for one channel or ``(N, H, W, 3)`` for
    RGB. ``channels=None`` picks 1 when every file is grayscale (read from the headers), else 3.
    Without ``img_size`` all images must already share one size. Images are decoded one at a time
    and only their resized arrays kept. Hidden entries and non-image files are ignored. A missing
    root, a root without class sub-folders, a class folder without images or mixed sizes raise
    :class:`DataError` naming the offending path. Files that cannot be read are found in one pass:
    ``unreadable="raise"`` raises :class:`UnreadableImagesError` naming every one; ``"skip"`` leaves them
    out and appends ``"path: reason"`` for each to ``skipped`` (a list, when given).
    """
    if unreadable not in ("raise", "skip"):
        raise ArgumentError(f"unreadable must be 'raise' or 'skip', got {unreadable!r}")
    ds = ImageFolderDataset(root, img_size=img_size, channels=channels, unreadable="skip")  # all, then decide
    problems = list(ds.skipped)
    arrays, keep = [], []
    from tqdm.auto import tqdm

    # decoding thousands of files takes seconds: a bar for a person watching (stderr a terminal)
    files = tqdm(ds.files, desc=f"reading {os.fspath(root)}", unit="image", leave=False,
                 disable=len(ds.files) < 500 or not sys.stderr.isatty())
    for i, f in enumerate(files):
        try:  # a header that reads can still hide a broken body: those are collected too
            a = ds[i]
        except ImageReadError as exc:
            problems.append(_reason(exc, f))
            continue
        if arrays and a.shape != arrays[0].shape:
            raise DataError(
                f"{f}: size {a.shape[1]}x{a.shape[0]} differs from {ds.files[keep[0]]} "
                f"({arrays[0].shape[1]}x{arrays[0].shape[0]}); pass img_size to resize all images"
            )
        arrays.append(a)
        keep.append(i)
    if problems and unreadable == "raise":
        raise UnreadableImagesError(os.fspath(root), problems)
    if skipped is not None:
        skipped.extend(problems)
    if not arrays:
        raise DataError(f"image folder {os.fspath(root)}: none of its image files can be read ({problems[0]})")
    return np.stack(arrays), ds.labels[keep], ds.class_names


# ------------------------------------------------------------------------------ arrays and batches


def split_holdout(n: int, holdout: Union[int, float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into ``(train_idx, holdout_idx)``, both sorted int64, from ``seed``.

    ``holdout`` is a count (int) or a fraction in ``[0, 1)`` (float). Used to carve a validation set
    out of the training split; the same ``(n, holdout, seed)`` always gives the same split.
    """
    if n < 0:
        raise ArgumentError(f"n must be >= 0, got {n}")
    if isinstance(holdout, (float, np.floating)):
        if not 0.0 <= holdout < 1.0:
            raise ArgumentError(f"a fractional holdout must lie in [0, 1), got {holdout}")
        k = int(round(holdout * n))
    else:
        k = int(holdout)
        if not 0 <= k <= n:
            raise ArgumentError(f"holdout must be between 0 and n={n}, got {k}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]).astype(np.int64), np.sort(perm[:k]).astype(np.int64)


def augment(batch: np.ndarray, rng: np.random.Generator, pad: int = 2, flip: bool = True) -> np.ndarray:
    """Random crop after zero padding by ``pad`` plus a random horizontal flip, per image.

    ``batch`` is ``(N, H, W)`` or ``(N, H, W, C)`` (any dtype); the result has the same shape and
    dtype and is a new array. Shifts of up to ``pad`` pixels and left-right mirroring keep garment
    identity in Fashion-MNIST (no vertical flips or rotations, which would). Each call draws
    ``2*N`` offsets then ``N`` flip coins from ``rng``, so a seeded generator reproduces it exactly.
    """
    batch = np.asarray(batch)
    if batch.ndim not in (3, 4):
        raise ArgumentError(f"augment expects (N, H, W) or (N, H, W, C), got shape {batch.shape}")
    if pad < 0:
        raise ArgumentError(f"pad must be >= 0, got {pad}")
    n, h, w = batch.shape[:3]
    out = batch.copy()
    if pad > 0:
        widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (batch.ndim - 3)
        padded = np.pad(batch, widths, mode="constant")
        oy, ox = rng.integers(0, 2 * pad + 1, size=(2, n))
        rows = oy[:, None] + np.arange(h)  # (N, H)
        cols = ox[:, None] + np.arange(w)  # (N, W)
        out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if flip:
        mask = rng.random(n) < 0.5
        out[mask] = out[mask][:, :, ::-1]
    return out


def iterate_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    shuffle: bool,
    rng: Optional[np.random.Generator] = None,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(images[idx], labels[idx])`` batches of ``batch_size`` over one epoch.

    With ``shuffle`` the order is one permutation drawn from ``rng`` (required then, so epochs are
    reproducible); without it the data is walked in order. ``drop_last`` skips a final short batch.
    """
    n = len(images)
    if len(labels) != n:
        raise ArgumentError(f"{n} images but {len(labels)} labels")
    if batch_size < 1:
        raise ArgumentError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle:
        if rng is None:
            raise ArgumentError("shuffle=True needs a numpy.random.Generator (rng)")
        order = rng.permutation(n)
    else:
        order = np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield images[idx], labels[idx]
