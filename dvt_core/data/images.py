"""Reading images safely, and turning them into the batch a model expects (:func:`preprocess`).

* Pillow opens only raster formats (:data:`ALLOWED_FORMATS`: PNG, JPEG, BMP, WebP, GIF, TIFF),
  recognised from the content: an EPS or any other format named ``.png`` is refused, never handed to
  the plugin (or the external program) that would read it.
* The pixel count is checked from the header before decoding, against :data:`MAX_PIXELS` (below
  Pillow's own decompression-bomb limit): a larger image is refused with a message naming it.
* Given the size the model needs, JPEG is decoded at a reduced scale (``draft``) and a large image is
  shrunk by an integer factor (``reduce``) before the final resize, so memory follows the output size.
* The EXIF orientation is applied: a photo stored sideways and tagged "rotate 90" is read upright.
* Any failure raises :class:`ImageReadError` (an InputError and a DataError) naming the file.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional, Sequence, Union

import numpy as np

from dvt_core.errors import ArgumentError, ImageReadError, InputError

ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
MAX_PIXELS = 40_000_000  # Pillow warns at 89 Mpx and refuses at twice that; a classifier input needs far less
_WIDE_GRAY = ("I", "I;16", "I;16B", "I;16L", "F")
_REDUCIBLE = ("L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "I", "F", "CMYK", "YCbCr", "LAB", "HSV", "PA")


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:  # pragma: no cover - Pillow is a declared dependency
        raise ImageReadError("reading image files needs Pillow: pip install pillow") from exc
    return Image, ImageOps


def _check_pixels(img, name: str, max_pixels: int) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageReadError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageReadError(f"{name}: image is {w}x{h} = {w * h:,} pixels; refused above {max_pixels:,} "
                             "(resize it first)")


def _reduce_for(img, target: Optional[int]):
    """Shrink each side by an integer factor while keeping it >= 2 * target (the final resize finishes), for
    every mode: ``reduce`` (a box filter) where Pillow has it, nearest-neighbour sampling otherwise (1-bit,
    palette, 16-bit). A long thin image is shrunk along its long side alone, so the resize never builds
    filter tables for millions of input pixels."""
    if not target:
        return img
    w, h = img.size
    fx, fy = max(1, w // (2 * target)), max(1, h // (2 * target))
    if fx == 1 and fy == 1:
        return img
    if img.mode in _REDUCIBLE:
        return img.reduce((fx, fy))
    Image, _ = _pil()
    return img.resize((max(1, w // fx), max(1, h // fy)), getattr(Image, "Resampling", Image).NEAREST)


def _source_name(source) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "image")


@contextlib.contextmanager
def _quiet():
    """Pillow's DecompressionBombWarning and numpy's RuntimeWarnings are this module's to turn into errors
    (the pixel cap is lower than Pillow's): they never reach the user as raw Python warnings."""
    Image, _ = _pil()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def open_image(source, target: Optional[int] = None, max_pixels: int = MAX_PIXELS):
    """A decoded, upright PIL image from a path, a file object or a PIL image.

    ``target`` (the model's side length) lets large images be decoded reduced: JPEG at 1/2 to 1/8 scale
    (``draft``), then any mode shrunk by integer factors. The pixel cap applies to what is decoded: a
    48-megapixel photo decoded at 1/8 scale is accepted. A path that is a FIFO, device or socket is
    refused without being opened. Raises ImageReadError.
    """
    Image, ImageOps = _pil()
    if isinstance(source, Image.Image):
        _check_pixels(source, "image", max_pixels)
        return ImageOps.exif_transpose(source)
    name = _source_name(source)
    if isinstance(source, (str, os.PathLike)):
        from dvt_core.schema import check_regular_file

        check_regular_file(source, "image", ImageReadError)
    try:
        with _quiet(), Image.open(source, formats=ALLOWED_FORMATS) as img:
            if target and img.format == "JPEG":
                img.draft(img.mode if img.mode in ("L", "RGB") else None, (2 * target, 2 * target))
            _check_pixels(img, name, max_pixels)  # the size that will be decoded (after draft)
            img.load()
            out = ImageOps.exif_transpose(_reduce_for(img, target))  # a new image: it owns no file handle
            return out if out is not img else img.copy()
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{name}: image file not found") from None
    except IsADirectoryError:
        raise ImageReadError(f"{name}: is a directory, not an image") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(f"{name}: unreadable image (not an image in an accepted format: "
                             f"{', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{name}: refused as a decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, TypeError, KeyError, IndexError,
            ZeroDivisionError, OverflowError) as exc:  # what a malformed file makes a Pillow plugin raise
        raise ImageReadError(f"{name}: unreadable image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                             ) from None


def is_gray(img) -> bool:
    return img.mode in ("1", "L", "LA") + _WIDE_GRAY


def to_array(img, img_size: Optional[int], channels: int, name: str = "image") -> np.ndarray:
    """uint8 ``(H, W)`` for 1 channel or ``(H, W, 3)`` for 3, resized bilinearly to ``img_size``."""
    Image, _ = _pil()
    if channels not in (1, 3):
        raise ArgumentError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if img_size is not None and img_size < 1:
        raise ArgumentError(f"img_size must be >= 1, got {img_size}")
    try:
        with _quiet():
            return _converted(img, Image, img_size, channels)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: unreadable image ({exc})") from None


def _converted(img, Image, img_size: Optional[int], channels: int) -> np.ndarray:
    """``img`` as uint8 grey or RGB at ``img_size``: wide grey rescaled, transparency over black."""
    if img.mode in _WIDE_GRAY:
        # Wide grayscale (16-bit PNG): rescale to 8 bits instead of letting convert() clip.
        a = np.asarray(img, dtype=np.float64)
        wide = img.mode.startswith("I;16") or (img.mode == "I" and a.size and a.max() > 255)
        a = a * (255.0 / 65535.0) if wide else a
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode in ("P", "PA", "LA", "RGBA") or "transparency" in img.info:
        # Composite transparent pixels over black, the background Fashion-MNIST uses.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, rgba).convert("RGB")
    img = img.convert("L" if channels == 1 else "RGB")
    if img_size is not None and img.size != (img_size, img_size):
        img = img.resize((img_size, img_size), getattr(Image, "Resampling", Image).BILINEAR)
    return np.asarray(img, dtype=np.uint8).copy()


def read_image(path, img_size: Optional[int] = None, channels: Optional[int] = None) -> np.ndarray:
    """One image file as uint8 (see :func:`to_array`); ``channels=None`` keeps grey grey, else RGB."""
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else "image"
    img = open_image(path, target=img_size)
    if channels is None:
        channels = 1 if is_gray(img) else 3
    return to_array(img, img_size, channels, name)


def peek_is_gray(path) -> bool:
    """Whether an image file is greyscale, from its header alone (nothing decoded)."""
    Image, _ = _pil()
    name = os.fspath(path)
    from dvt_core.schema import check_regular_file

    check_regular_file(path, "image", ImageReadError)
    try:
        with _quiet(), Image.open(path, formats=ALLOWED_FORMATS) as img:
            return is_gray(img)
    except FileNotFoundError:
        raise ImageReadError(f"{name}: image file not found") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(f"{name}: unreadable image (not an image in an accepted format: "
                             f"{', '.join(ALLOWED_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"{name}: unreadable image ({exc})") from None


def _array_to_uint8_image(a: np.ndarray, spec) -> np.ndarray:
    """One uint8 image array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) resized/converted for ``spec``."""
    Image, _ = _pil()
    if a.dtype != np.uint8:
        raise InputError(f"preprocess takes uint8 arrays (0..255); got {a.dtype} (normalised input goes to the "
                         "model directly)")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        img = Image.fromarray(a, "L")
    elif a.ndim == 3 and a.shape[-1] in (3, 4):
        img = Image.fromarray(np.ascontiguousarray(a), "RGB" if a.shape[-1] == 3 else "RGBA")
    else:
        raise InputError(f"an image array is (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {a.shape}")
    _check_pixels(img, "image array", MAX_PIXELS)
    return to_array(img, spec.img_size, 1 if spec.in_chans == 1 else 3)


def _items(images) -> list:
    if isinstance(images, (str, os.PathLike)):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4 or (images.ndim == 3 and images.shape[-1] not in (1, 3, 4)):
            return list(images)  # a batch (N, H, W[, C])
        return [images]
    try:
        from PIL import Image

        if isinstance(images, Image.Image):
            return [images]
    except ImportError:  # pragma: no cover
        pass
    if isinstance(images, Sequence) or hasattr(images, "__iter__"):
        return list(images)
    raise InputError(f"preprocess takes paths, PIL images or uint8 arrays; got {type(images).__name__}")


def normalize(
    images: np.ndarray, mean: Union[float, Sequence[float]], std: Union[float, Sequence[float]]
) -> np.ndarray:
    """uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` to float32 ``(N, C, H, W)``: ``(x/255 - mean) / std``.

    ``mean`` and ``std`` are scalars or one value per channel. The channels-first float32 layout is
    what both backends feed to the model.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ArgumentError(f"normalize expects uint8 images (0..255), got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    elif images.ndim != 4:
        raise ArgumentError(f"normalize expects (N, H, W) or (N, H, W, C), got shape {images.shape}")
    c = images.shape[-1]
    mean_a = np.asarray(mean, dtype=np.float32).reshape(-1)
    std_a = np.asarray(std, dtype=np.float32).reshape(-1)
    for name, v in (("mean", mean_a), ("std", std_a)):
        if v.size not in (1, c):
            raise ArgumentError(f"{name} has {v.size} values for {c} channel(s)")
    if np.any(std_a <= 0):
        raise ArgumentError(f"std must be positive, got {std_a.tolist()}")
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    x -= mean_a.reshape(1, -1, 1, 1)
    x /= std_a.reshape(1, -1, 1, 1)
    return np.ascontiguousarray(x)


def preprocess(images, spec) -> np.ndarray:
    """The normalised float32 batch ``(N, C, H, W)`` that a model built from ``spec`` expects.

    ``images`` is one image or a sequence of them: file paths, PIL images or uint8 arrays
    (``(H, W)``, ``(H, W, C)``, or a batch ``(N, H, W[, C])``). Each is read with the safeguards of
    this module (allowed formats, pixel cap, EXIF orientation), converted to grey or RGB as
    ``spec.in_chans`` says, resized bilinearly to ``spec.img_size`` square, then normalised with
    ``spec.mean`` / ``spec.std``. An unreadable file raises :class:`ImageReadError` naming it.
    ``spec`` is a CascadeSpec or a model name.
    """
    if isinstance(spec, str):
        from dvt_core.model.zoo import get_spec

        spec = get_spec(spec)
    if spec.in_chans not in (1, 3):
        raise InputError(f"{spec.name}: preprocess handles 1- or 3-channel models; this one has {spec.in_chans}")
    channels = 1 if spec.in_chans == 1 else 3
    items = _items(images)
    if not items:
        raise InputError("preprocess got no images")
    Image, _ = _pil()
    arrays = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            arrays.append(read_image(item, spec.img_size, channels))
        elif isinstance(item, Image.Image):
            arrays.append(to_array(open_image(item), spec.img_size, channels))
        elif isinstance(item, np.ndarray):
            arrays.append(_array_to_uint8_image(item, spec))
        else:
            raise InputError(f"preprocess takes paths, PIL images or uint8 arrays; got {type(item).__name__}")
    return normalize(np.stack(arrays), spec.mean, spec.std)


def find_images(root: Union[str, os.PathLike], recursive: bool = True) -> list[str]:
    """Image files under ``root`` (sorted, hidden entries skipped), by the extensions Pillow formats use."""
    root = os.fspath(root)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found.extend(os.path.join(folder, f) for f in files
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)
