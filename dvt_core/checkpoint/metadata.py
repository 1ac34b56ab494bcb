"""A checkpoint's metadata (and an export's copy of it), checked as untrusted input: every field the project
reads (its spec, thresholds, budgets, classes, holdout, seed, mean / std, the training record) for type,
range and length, before anything uses it."""
from __future__ import annotations

from typing import Callable, Optional

from dvt_core.errors import CheckpointError
from dvt_core.model.specs import check_spec_dict
from dvt_core.schema import MAX_BENCH_BATCH, MAX_CLASS_NAME, MAX_CLASSES, MAX_LIST, MAX_SEED, check_name, show_value, \
    want_dict, want_float, want_int, want_list, want_str


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


# A cost profile (``dvt profile``, :mod:`dvt_core.runtime.cost_model`): each stage's measured time inside the
# cascade per runtime, precision and batch size, with the machine it was measured on. Untrusted like all metadata:
# every number bounded, every string capped, so a tampered one is refused by name before any budget uses it.
COST_PROFILE_VERSION = 1
MAX_PROFILE_BATCHES = 32
MAX_STAGE_MS = 1e6  # ms per image: no stage of a supported model takes a quarter of an hour per image


def check_cost_profile(value, where: str, error, exits: Optional[int]) -> dict:
    """A stored cost profile checked field by field; ``error`` names ``where`` and the field."""
    want_dict(value, where, error)
    if value.get("version") != COST_PROFILE_VERSION:
        raise error(f"{where}.version is {show_value(value.get('version'))}; this dvt reads cost profiles of version "
                    f"{COST_PROFILE_VERSION} (measure again with `dvt profile`)")
    for key in ("runtime", "precision"):
        want_str(value.get(key), f"{where}.{key}", 32, error=error)
    if value.get("threads") is not None:
        want_int(value["threads"], f"{where}.threads", 1, 4096, error)
    machine = want_dict(value.get("machine") or {}, f"{where}.machine", error)
    for key, v in machine.items():
        if isinstance(v, dict):
            for k, x in v.items():
                want_str(x, f"{where}.machine.{key}.{show_value(k, 32)}", 256, error=error)
        elif v is not None and not isinstance(v, (bool, int)):
            want_str(v, f"{where}.machine.{key}", 256, error=error)
    seen = set()
    for i, row in enumerate(want_list(value.get("batches"), f"{where}.batches", max_len=MAX_PROFILE_BATCHES,
                                      error=error)):
        batch = _check_profile_row(row, f"{where}.batches[{i}]", error, exits)
        if batch in seen:
            raise error(f"{where}.batches[{i}].batch {batch} is measured twice")
        seen.add(batch)
    if not seen:
        raise error(f"{where}.batches is empty: no batch size was measured")
    return value


def _check_profile_row(row, here: str, error, exits: Optional[int]) -> int:
    """One batch size's row of a cost profile checked field by field; its batch size."""
    want_dict(row, here, error)
    batch = want_int(row.get("batch"), f"{here}.batch", 1, MAX_BENCH_BATCH, error)
    stage_ms = want_list(row.get("stage_ms"), f"{here}.stage_ms", exits, error=error)
    for j, ms in enumerate(stage_ms):
        want_float(ms, f"{here}.stage_ms[{j}]", 0.0, MAX_STAGE_MS, low_open=True, error=error)
    if row.get("stage_hot_ms") is not None:  # optional: a profile without it means hot == all-through
        for j, ms in enumerate(want_list(row["stage_hot_ms"], f"{here}.stage_hot_ms", len(stage_ms), error=error)):
            want_float(ms, f"{here}.stage_hot_ms[{j}]", 0.0, MAX_STAGE_MS, low_open=True, error=error)
    if row.get("stage_shape_ms") is not None:  # optional: a call's extra ms after one with another image count
        for j, ms in enumerate(want_list(row["stage_shape_ms"], f"{here}.stage_shape_ms", len(stage_ms),
                                         error=error)):
            want_float(ms, f"{here}.stage_shape_ms[{j}]", 0.0, MAX_STAGE_MS, error=error)
    if row.get("static_ms") is not None:
        want_float(row["static_ms"], f"{here}.static_ms", 0.0, MAX_STAGE_MS, low_open=True, error=error)
    for key in ("overhead_ms", "total_ms"):
        if row.get(key) is not None:
            want_float(row[key], f"{here}.{key}", 0.0, MAX_STAGE_MS, error=error)
    if row.get("stage_call_ms") is not None:  # a fixed cost per call is at most the stage's whole call
        for j, ms in enumerate(want_list(row["stage_call_ms"], f"{here}.stage_call_ms", len(stage_ms),
                                         error=error)):
            want_float(ms, f"{here}.stage_call_ms[{j}]", 0.0, stage_ms[j] * batch * (1 + 1e-9), error=error)
    return batch


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
    "cost_profile": lambda v, w, e, n: check_cost_profile(v, w, e, n),
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
