"""A checkpoint's metadata (and an export's copy of it), checked as untrusted input: every field the project
reads (its spec, thresholds, budgets, classes, holdout, seed, mean / std, the training record) for type,
range and length, before anything uses it."""
from __future__ import annotations

from typing import Callable, Optional

from dvt_core.errors import CheckpointError
from dvt_core.model.specs import check_spec_dict
from dvt_core.schema import MAX_CLASS_NAME, MAX_CLASSES, MAX_LIST, MAX_SEED, check_name, want_dict, want_float, \
    want_int, want_list, want_str


def _numbers(value, where: str, error, length=None, low=None, high=None) -> list:
    return [want_float(v, f"{where}[{i}]", low, high, error=error)
            for i, v in enumerate(want_list(value, where, length, error=error))]


def _check_thresholds(value, where: str, error, exits: Optional[int]) -> None:
    # sentinels 1e8 / -1e8 (no image / every image leaves) are part of the format
    _numbers(value, where, error, exits, -1e9, 1e9)


def _check_budgets(value, where: str, error, exits: Optional[int]) -> None:
    for i, row in enumerate(want_list(value, where, error=error)):
        here = f"{where}[{i}]"
        want_dict(row, here, error)
        if "thresholds" in row:
            _check_thresholds(row["thresholds"], f"{here}.thresholds", error, exits)
        for key, v in row.items():
            if key != "thresholds" and v is not None and not isinstance(v, (str, dict, list)):
                want_float(v, f"{here}.{key}", error=error)


def _check_dataset(value, where: str, error) -> None:
    """A data set's name or folder path, or the trainer's record of it
    (:func:`dvt_core.training.config.dataset_record`: name, path, split, images, holdout, seed)."""
    if isinstance(value, str):
        want_str(value, where, 4096, error=error)
        return
    want_dict(value, where, error)
    for key in ("name", "path", "split"):
        if value.get(key) is not None:
            want_str(value[key], f"{where}.{key}", 4096, error=error)
    for key, high in (("images", 1 << 40), ("holdout", 1 << 40), ("seed", MAX_SEED)):
        if value.get(key) is not None:
            want_int(value[key], f"{where}.{key}", 0, high, error)
    if value.get("images") is not None and value.get("holdout") is not None and value["holdout"] > value["images"]:
        raise error(f"{where}: holdout {value['holdout']} is more than its {value['images']} images")


META_RULES: dict[str, Callable] = {
    "arch": lambda v, w, e, n: check_name(v, w, e),
    "thresholds": lambda v, w, e, n: _check_thresholds(v, w, e, n),
    "budgets": lambda v, w, e, n: _check_budgets(v, w, e, n),
    "default_budget": lambda v, w, e, n: want_int(v, w, 0, MAX_LIST, e),
    "exit_macs": lambda v, w, e, n: [want_int(x, f"{w}[{i}]", 0, 1 << 62, e)
                                     for i, x in enumerate(want_list(v, w, n, error=e))],
    "classes": lambda v, w, e, n: [want_str(c, f"{w}[{i}]", MAX_CLASS_NAME, error=e)
                                   for i, c in enumerate(want_list(v, w, max_len=MAX_CLASSES, error=e))],
    "class_names": lambda v, w, e, n: META_RULES["classes"](v, w, e, n),
    "dataset": lambda v, w, e, n: _check_dataset(v, w, e),
    "holdout": lambda v, w, e, n: want_int(v, w, 0, 1 << 40, e),
    "holdout_indices_seed": lambda v, w, e, n: want_int(v, w, 0, MAX_SEED, e),
    "seed": lambda v, w, e, n: want_int(v, w, 0, MAX_SEED, e),
    "mean": lambda v, w, e, n: _numbers(v, w, e, None),
    "std": lambda v, w, e, n: [want_float(x, f"{w}[{i}]", 0.0, low_open=True, error=e)
                               for i, x in enumerate(want_list(v, w, error=e))],
    "holdout_anytime_accuracy": lambda v, w, e, n: _numbers(v, w, e, n, 0.0, 100.0),  # percent
}


def add_meta_rule(key: str, rule: Callable) -> None:
    """Check metadata field ``key`` with ``rule(value, where, error, exits)``: for a record whose type a
    higher layer defines (``train``: :mod:`dvt_core.training.config`, which the ``dvt_core`` package imports
    before anything reads a checkpoint)."""
    META_RULES[key] = rule


def check_checkpoint_meta(meta, where: str, error=CheckpointError) -> dict:
    """``meta`` (a checkpoint's or an export's metadata) with every field the project uses checked for
    type, range and length (its spec, thresholds, budgets, classes, holdout, seed, mean / std, ...).
    Fields nothing reads are kept as they are. A ``null`` field counts as absent."""
    want_dict(meta, where, error)
    exits = None
    if meta.get("spec") is not None:
        spec = check_spec_dict(meta["spec"], f"{where}: spec", error)
        exits = spec.num_exits
        if meta.get("classes") is not None and isinstance(meta["classes"], list) \
                and len(meta["classes"]) not in (0, spec.num_classes):
            raise error(f"{where}: classes names {len(meta['classes'])} classes, the spec has {spec.num_classes}")
    for key, rule in META_RULES.items():
        if meta.get(key) is not None:
            rule(meta[key], f"{where}: {key}", error, exits)
    return meta
