"""Data sets by name: Fashion-MNIST (its train / test splits and the held-out part of train that
training keeps for calibration) or a folder with one sub-folder per class."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Union

import numpy as np

from dvt_core.data import sources as dvt_data
from dvt_core.errors import InputError

# The held-out part training keeps for calibration, by default (dvt_core.training.config.TrainConfig's
# defaults are these): images of Fashion-MNIST, a fraction of an image folder, and the seed that picks them.
HOLDOUT = 5000
FOLDER_HOLDOUT = 0.1
HOLDOUT_SEED = 0


def is_fashion_mnist(name) -> bool:
    return str(name).lower().replace("_", "-") == "fashion-mnist"


def holdout_params(meta: Optional[dict]) -> tuple[Union[int, float], int]:
    """(size, seed) of the held-out part a checkpoint's training kept out (the trainer's defaults if
    unknown). The size is a count (int) or a fraction of the training set (float)."""
    meta = meta or {}
    train = meta.get("train") or {}
    size = train.get("holdout", meta.get("holdout", HOLDOUT))
    seed = train.get("seed", meta.get("holdout_indices_seed", HOLDOUT_SEED))
    size = float(size) if isinstance(size, float) and not float(size).is_integer() else int(size)
    return size, int(seed)


def dataset_key(name) -> str:
    """A data set's identity for comparison: ``fashion-mnist``, or the folder's absolute
    path (so that ``dvt calibrate`` / ``dvt evaluate`` find it from any working directory)."""
    return "fashion-mnist" if is_fashion_mnist(name) else str(Path(name).expanduser().resolve())


def trained_on(meta: Optional[dict]) -> Optional[dict]:
    """Where a checkpoint was trained, from its metadata: ``dataset`` (``fashion-mnist`` or a folder),
    ``holdout`` and ``seed`` (its held-out part) and ``images`` (how many the data set held); None when
    the metadata does not say."""
    meta = meta or {}
    record = meta.get("dataset")
    images = meta.get("dataset_images")
    if isinstance(record, dict):  # the trainer's record (dvt_core.training.config.dataset_record)
        name = record.get("path") or record.get("name")
        images = record.get("images", images)
    else:  # a name or a folder path alone
        name = record
    if not isinstance(name, str) or not name:
        return None
    size, seed = holdout_params(meta)
    if isinstance(record, dict) and isinstance(record.get("seed"), int) and not isinstance(record["seed"], bool):
        seed = record["seed"]
    if isinstance(record, dict) and isinstance(record.get("holdout"), int) and not isinstance(record["holdout"], bool):
        size = record["holdout"]
    elif "holdout" in meta and not isinstance(meta["holdout"], bool):  # the count the trainer kept out
        size = meta["holdout"]
    return {"dataset": name, "holdout": size, "seed": seed, "images": images if isinstance(images, int) else None}


def _report_skipped(root, skipped: list, file=None) -> None:
    if not skipped:
        return
    file = file or sys.stderr
    print(f"note: skipped {len(skipped)} unreadable image file(s) in {root}:", file=file)
    for line in skipped:
        print(f"  {line}", file=file)


def _held_out(n: int, size, seed: int, name) -> np.ndarray:
    """The indices of the held-out part of ``n`` images, as the trainer drew it; InputError for a size (a
    checkpoint's metadata says it) that does not fit the data set, not a traceback."""
    fits = 0 <= size < 1 if isinstance(size, float) else 0 <= int(size) <= n
    if not fits:
        raise InputError(f"a held-out part of {size} images cannot be drawn from the {n} images of {name} "
                         "(the checkpoint's metadata says holdout); pass --dataset DIR to use other images")
    return dvt_data.split_holdout(n, size, seed)[1]


def load_dataset(name, split: str, spec, holdout: Optional[Union[int, float]] = None, seed: Optional[int] = None,
                 unreadable: str = "skip"):
    """(uint8 images, int64 labels, class names) of ``fashion-mnist`` or an image folder.

    ``split="holdout"`` is the part of the training set kept out of training: ``holdout`` images (or a
    fraction of them) drawn with ``seed``, as the trainer draws them (defaults:
    :class:`~dvt_core.training.config.TrainConfig`'s; pass a checkpoint's own with :func:`holdout_params`).
    An image folder has no train/test splits: ``holdout`` is its held-out part (drawn the same way from
    the folder's images in sorted order), any other split all of it. Unreadable files of a folder are
    all found in one pass: skipped and listed on stderr (``unreadable="skip"``), or refused, every one
    named (``"raise"``).
    """
    if is_fashion_mnist(name):
        if split == "holdout":
            x, y = dvt_data.load_fashion_mnist("train")
            default_size, default_seed = holdout_params(None)
            size = default_size if holdout is None else holdout
            hold = _held_out(len(x), size, default_seed if seed is None else int(seed), name)
            return x[hold], y[hold], list(dvt_data.FASHION_MNIST_CLASSES)
        x, y = dvt_data.load_fashion_mnist(split)
        return x, y, list(dvt_data.FASHION_MNIST_CLASSES)
    root = Path(name)
    if not root.exists():
        raise InputError(f"unknown dataset {str(name)!r}: use fashion-mnist or a folder with one sub-folder per class")
    if spec.in_chans not in (1, 3):
        raise InputError(f"{spec.name} takes {spec.in_chans}-channel images; image files give 1 (grey) or 3 (RGB)")
    skipped: list = []
    x, y, classes = dvt_data.load_image_folder(root, img_size=spec.img_size, channels=spec.in_chans,
                                               unreadable=unreadable, skipped=skipped)
    _report_skipped(root, skipped)
    if split == "holdout":
        size = FOLDER_HOLDOUT if holdout is None else holdout
        hold = _held_out(len(y), size, holdout_params(None)[1] if seed is None else int(seed), name)
        return x[hold], y[hold], classes
    return x, y, classes


def load_for_model(name, split: str, spec, meta: Optional[dict], holdout=None, seed=None):
    """:func:`load_dataset` with an image folder's classes numbered as the model numbers them
    (:func:`match_folder_classes`): ``(images, labels, class names)``."""
    x, y, classes = load_dataset(name, split, spec, holdout, seed)
    if not is_fashion_mnist(name):
        y, classes = match_folder_classes(y, classes, meta, spec)
    if len(y) and int(y.max()) >= spec.num_classes:
        raise InputError(f"{name} has {int(y.max()) + 1} classes but {spec.name} predicts {spec.num_classes}")
    return x, y, classes


def calibration_set(meta: Optional[dict], spec, dataset=None, limit: Optional[int] = None):
    """The images a checkpoint's thresholds are found on: ``(images, labels, description)``.

    Without ``dataset``: the held-out part of the data set the checkpoint records it was trained on
    (Fashion-MNIST when it records none). ``fashion-mnist``: the held-out part of its training split. The
    folder the checkpoint was trained on: its held-out part, drawn again as the trainer drew it (refused
    when the folder no longer holds as many images). Any other folder: all of it (images the model never
    trained on). ``limit`` keeps only the first images.
    """
    origin = trained_on(meta)
    size, seed = holdout_params(meta)
    if origin is not None:
        size, seed = origin["holdout"], origin["seed"]
    if dataset is None:
        dataset = origin["dataset"] if origin is not None else "fashion-mnist"
    if is_fashion_mnist(dataset):
        x, y, _ = load_for_model(dataset, "holdout", spec, meta, size, seed)
        desc = {"dataset": "fashion-mnist", "split": "holdout", "holdout": size, "seed": seed}
    elif origin is not None and not is_fashion_mnist(origin["dataset"]) and \
            dataset_key(dataset) == dataset_key(origin["dataset"]):
        if not Path(dataset).exists():
            raise InputError(f"the checkpoint was trained on {dataset}, which does not exist (any more); pass "
                             "--dataset DIR (images the model did not train on) to calibrate on")
        if not size:
            raise InputError(f"the checkpoint was trained on all of {dataset} (holdout 0): nothing was held out; "
                             "pass --dataset DIR (images the model did not train on) to calibrate on")
        x, y, _ = load_for_model(dataset, "all", spec, meta)
        if origin["images"] is not None and origin["images"] != len(y):
            raise InputError(f"{dataset} now holds {len(y)} readable images, not the {origin['images']} the model "
                             "was trained on, so its held-out part cannot be drawn again; pass --dataset DIR "
                             "(images the model did not train on)")
        hold = _held_out(len(y), size, seed, dataset)
        x, y = x[hold], y[hold]
        desc = {"dataset": dataset_key(dataset), "split": "holdout", "holdout": size, "seed": seed}
    else:
        x, y, _ = load_for_model(dataset, "all", spec, meta)
        desc = {"dataset": dataset_key(dataset), "split": "all"}
    if limit:
        x, y = x[:limit], y[:limit]
        desc["limit"] = int(limit)
    if len(y) == 0:
        raise InputError(f"no calibration images in {dataset} ({desc['split']})")
    return x, y, desc


def _norm_name(name: str) -> str:
    """A class name compared forgivingly: case, spaces, ``_``, ``-``, ``/`` and other punctuation ignored."""
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def _name_forms(name: str) -> set:
    """The forms a class name is matched by: all of it, and each of its ``/``-separated parts
    (``T-shirt/top`` is matched by ``tshirt``, ``T_Shirt``, ``top`` and ``t-shirt-top``)."""
    return {f for f in [_norm_name(name), *(_norm_name(p) for p in str(name).split("/"))] if f}


def model_classes(meta: Optional[dict], num_classes: int) -> Optional[list]:
    """The class names a checkpoint's metadata stores (``classes``; older trained checkpoints wrote
    ``class_names``), when there is one per class."""
    meta = meta or {}
    for key in ("classes", "class_names"):
        classes = meta.get(key)
        if isinstance(classes, list) and len(classes) == num_classes:
            return [str(c) for c in classes]
    return None


def model_name(meta: Optional[dict], arch: str) -> str:
    """The name a model goes by: the one its weights were trained under (``meta["name"]``, written by ``dvt
    train``), else its architecture's ``arch``; a model trained on one's own folder is not the shipped one."""
    name = (meta or {}).get("name")
    return name if isinstance(name, str) and name else arch


def trained_on_fashion_mnist(meta: Optional[dict]) -> bool:
    """Whether the weights' metadata says they were trained on Fashion-MNIST (the shipped weights write the data set's
    name, ``dvt train`` a record with it)."""
    dataset = (meta or {}).get("dataset")
    name = dataset.get("name") if isinstance(dataset, dict) else dataset
    return isinstance(name, str) and is_fashion_mnist(name)


def folder_class_index(folder_classes: list, model_names: list) -> list:
    """For each sub-folder name, the model's class it names (matched forgivingly, see :func:`_name_forms`);
    InputError listing every sub-folder that names no class, names several, or shares a class with another."""
    index, unmatched = [], []
    for folder in folder_classes:
        key = _norm_name(folder)
        hits = [i for i, c in enumerate(model_names) if key in _name_forms(c)]
        if len(hits) > 1:  # a part shared by several names: only the whole name decides
            hits = [i for i in hits if _norm_name(model_names[i]) == key]
        index.append(hits[0] if len(hits) == 1 else None)
        if len(hits) != 1:
            unmatched.append(folder)
    if unmatched:
        raise InputError(f"class folder(s) {', '.join(map(repr, unmatched))} match none of the model's classes "
                         f"({', '.join(model_names)}); rename them after these (case, spaces, _, - and / do not "
                         "matter)")
    taken = {}
    for folder, i in zip(folder_classes, index):
        if i in taken:
            raise InputError(f"class folders {taken[i]!r} and {folder!r} both name the model's class "
                             f"{model_names[i]!r}; merge them")
        taken[i] = folder
    return index


def match_folder_classes(labels: np.ndarray, folder_classes: list, meta: Optional[dict], spec):
    """(labels, classes) of an image folder in the numbering of the model ``meta`` describes.

    A folder numbers its classes in sorted sub-folder order; when the checkpoint names its classes each
    sub-folder is matched to one of them forgivingly (case, spaces, ``_``, ``-``, ``/`` ignored; one part
    of a ``/``-separated name is enough), and anything left unmatched is refused with the names listed.
    A checkpoint without class names keeps the folder's own numbering, which must fit its classes.
    """
    names = model_classes(meta, spec.num_classes)
    if not names:
        if len(folder_classes) > spec.num_classes:
            raise InputError(f"the folder has {len(folder_classes)} classes ({', '.join(folder_classes)}) but "
                             f"{spec.name} predicts {spec.num_classes}")
        return labels, list(folder_classes)
    index = folder_class_index(folder_classes, names)
    return np.asarray(index, dtype=np.int64)[labels], list(names)
