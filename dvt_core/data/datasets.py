"""Data sets by name: Fashion-MNIST (its train / test splits and the held-out part of train that
training keeps for calibration) or a folder with one sub-folder per class."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np

from dvt_core.data import sources as dvt_data
from dvt_core.errors import InputError


def is_fashion_mnist(name) -> bool:
    return str(name).lower().replace("_", "-") == "fashion-mnist"


def holdout_params(meta: Optional[dict]) -> tuple[Union[int, float], int]:
    """(size, seed) of the held-out part a checkpoint's training kept out (the trainer's defaults if
    unknown). The size is a count (int) or a fraction of the training set (float)."""
    from dvt_core.training.config import TrainConfig

    meta = meta or {}
    train = meta.get("train") or {}
    size = train.get("holdout", meta.get("holdout", TrainConfig().holdout))
    seed = train.get("seed", meta.get("holdout_indices_seed", TrainConfig().seed))
    size = float(size) if isinstance(size, float) and not float(size).is_integer() else int(size)
    return size, int(seed)


def load_dataset(name, split: str, spec, holdout: Optional[Union[int, float]] = None, seed: Optional[int] = None):
    """(uint8 images, int64 labels, class names) of ``fashion-mnist`` or an image folder.

    ``split="holdout"`` is the part of the training set kept out of training: ``holdout`` images (or a
    fraction of them) drawn with ``seed``, as the trainer draws them (defaults:
    :class:`~dvt_core.training.config.TrainConfig`'s; pass a checkpoint's own with :func:`holdout_params`).
    An image folder has no splits: all of it is used.
    """
    if is_fashion_mnist(name):
        if split == "holdout":
            x, y = dvt_data.load_fashion_mnist("train")
            default_size, default_seed = holdout_params(None)
            size = default_size if holdout is None else holdout
            _, hold = dvt_data.split_holdout(len(x), size, default_seed if seed is None else int(seed))
            return x[hold], y[hold], list(dvt_data.FASHION_MNIST_CLASSES)
        x, y = dvt_data.load_fashion_mnist(split)
        return x, y, list(dvt_data.FASHION_MNIST_CLASSES)
    root = Path(name)
    if not root.exists():
        raise InputError(f"unknown dataset {str(name)!r}: use fashion-mnist or a folder with one sub-folder per class")
    if spec.in_chans not in (1, 3):
        raise InputError(f"{spec.name} takes {spec.in_chans}-channel images; image files give 1 (grey) or 3 (RGB)")
    return dvt_data.load_image_folder(root, img_size=spec.img_size, channels=spec.in_chans)


def _norm_name(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def model_classes(meta: Optional[dict], num_classes: int) -> Optional[list]:
    """The class names a checkpoint's metadata stores, when there is one per class."""
    classes = (meta or {}).get("classes")
    if isinstance(classes, list) and len(classes) == num_classes:
        return [str(c) for c in classes]
    return None


def match_folder_classes(labels: np.ndarray, folder_classes: list, meta: Optional[dict], spec):
    """(labels, classes, note) for an image folder evaluated with a checkpoint.

    A folder numbers its classes in sorted sub-folder order. When the checkpoint names its classes and
    every sub-folder matches one of them (ignoring case and punctuation), the checkpoint's numbering is
    used; otherwise the folder's is kept, and ``note`` says so when the names differ (else None).
    """
    names = model_classes(meta, spec.num_classes)
    if not names:
        return labels, folder_classes, None
    lookup = {_norm_name(c): i for i, c in enumerate(names)}
    index = [lookup.get(_norm_name(c)) for c in folder_classes]
    if all(i is not None for i in index):
        return np.asarray(index, dtype=np.int64)[labels], list(names), None
    note = None
    if [_norm_name(c) for c in folder_classes] != [_norm_name(c) for c in names[:len(folder_classes)]]:
        note = (f"the folder's classes ({', '.join(folder_classes)}) are not the model's "
                f"({', '.join(names)}); they are numbered in sorted order")
    return labels, folder_classes, note
