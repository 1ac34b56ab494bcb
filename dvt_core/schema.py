"""Where untrusted input becomes trusted: every value read from outside is checked here before any work.

Checkpoint metadata, an export's ``dvt.json``, spec dictionaries, ``-O KEY=VALUE`` overrides and
command-line numbers come from files and people the project does not control. Each reader calls one of
the checkers below, which:

* cap the size before parsing (bytes of a file, characters of a value, nesting depth of JSON);
* refuse special files (FIFO, device, socket) from ``stat`` alone, never opening them for reading;
* check type, range and length of every field the code later uses, raising a :class:`DVTError`
  subclass whose message names the field (``dvt.json: stages[1].sha256 is not ...``);
* resolve every path a file names inside its folder (no absolute path, no ``..``, no symbolic link out).

Nothing here imports a framework.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import stat
from pathlib import Path
from typing import Callable, Optional

from dvt_core.errors import ArgumentError, CheckpointError, DVTError, InputError, ManifestError, SpecError

# ---- limits -------------------------------------------------------------------------------------------
MAX_JSON_BYTES = 8 << 20          # a manifest or a metadata string: it describes a model, it never holds one
MAX_JSON_DEPTH = 32
MAX_OVERRIDE_CHARS = 4096
MAX_LIST = 65536                  # items of any one list in metadata (classes, budgets, ...)
MAX_CLASS_NAME = 512
MAX_EXITS = 16
MAX_CLASSES = 1_000_000
MAX_IMG_SIZE = 4096
MAX_CHANNELS = 16
MAX_WIDTH = 16384                 # embed_dim, token_dim
MAX_DEPTH = 256
MAX_HEADS = 1024
MAX_TOKENS = 16384                # tokens of one stage (a 128x128 grid): attention is N^2 per head
MAX_PARAMS = 2_000_000_000        # parameters of a whole cascade (8 GB of float32)
MAX_SEED = 2 ** 32 - 1
MAX_BENCH_BATCH = 4096            # images of one timed batch (4096 RGB 224x224 images are 2.4 GB)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- plain values ------------------------------------------------------------------------------------

def want_int(value, where: str, low: Optional[int] = None, high: Optional[int] = None, error=InputError) -> int:
    """``value`` as an int (a whole float such as 3.0 accepted, a bool refused) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise error(f"{where} must be a whole number, got {_show(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise error(f"{where} must lie in [{low if low is not None else '-inf'}, "
                    f"{high if high is not None else 'inf'}], got {value}")
    return value


def want_float(value, where: str, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False, high_open: bool = False, error=InputError) -> float:
    """``value`` as a finite float within its bounds (``*_open``: the bound itself excluded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{where} must be a number, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise error(f"{where} must be a finite number, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise error(f"{where} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value > high or (high_open and value == high)):
        raise error(f"{where} must be {'<' if high_open else '<='} {high:g}, got {value:g}")
    return value


def want_str(value, where: str, max_len: int = 4096, pattern: Optional[re.Pattern] = None, error=InputError) -> str:
    if not isinstance(value, str):
        raise error(f"{where} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise error(f"{where} is {len(value)} characters long (at most {max_len})")
    if pattern is not None and not pattern.match(value):
        raise error(f"{where} {_show(value)} is not a plain name (letters, digits, '.', '_', '+', '-'; "
                    "no path separators)")
    return value


def want_list(value, where: str, length: Optional[int] = None, max_len: int = MAX_LIST, error=InputError) -> list:
    if not isinstance(value, (list, tuple)):
        raise error(f"{where} must be a list, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise error(f"{where} must hold {length} values, got {len(value)}")
    if len(value) > max_len:
        raise error(f"{where} holds {len(value)} values (at most {max_len})")
    return list(value)


def want_dict(value, where: str, error=InputError) -> dict:
    if not isinstance(value, dict):
        raise error(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def want_bool(value, where: str, error=InputError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{where} must be true or false, got {_show(value)}")
    return value


def check_name(value, where: str = "name", error=SpecError) -> str:
    """A model or spec name: never a path (no separator, no ``..``, no leading dot), at most 128 characters."""
    return want_str(value, where, 128, NAME_RE, error)


# ---- override values: a small typed parser, not YAML ------------------------------------------------------

_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_FLOAT_RE = re.compile(r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$|^[+-]?(?:inf|nan)$", re.I)


def _scalar(text: str, where: str):
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    if _INT_RE.match(t):
        return int(t)
    if _FLOAT_RE.match(t):
        return float(t)
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    if any(c in t for c in "[](){}"):
        raise ArgumentError(f"{where}: unbalanced or nested brackets in {_show(text)} (a list is [a, b, c])")
    return t


def parse_value(text: str, where: str = "value"):
    """``"10"`` -> 10, ``"1e-3"`` -> 0.001, ``"true"`` -> True, ``"[2, 4, 7]"`` / ``"(2,4,7)"`` -> [2, 4, 7],
    anything else a string. One level of list only; ArgumentError naming ``where`` otherwise."""
    if not isinstance(text, str):
        raise ArgumentError(f"{where} must be text, got {type(text).__name__}")
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ArgumentError(f"{where} is {len(text)} characters long (at most {MAX_OVERRIDE_CHARS})")
    t = text.strip()
    if t[:1] in "[(" or t[-1:] in "])":
        closing = {"[": "]", "(": ")"}.get(t[:1])
        if closing is None or not t.endswith(closing):
            raise ArgumentError(f"{where}: unbalanced brackets in {_show(text)} (a list is [a, b, c])")
        inner = t[1:-1].strip()
        return [] if not inner else [_scalar(part, where) for part in inner.split(",")]
    return _scalar(t, where)


def parse_overrides(items) -> dict:
    """``["num_classes=10", "grids=[2,4,7]"]`` -> ``{"num_classes": 10, "grids": [2, 4, 7]}``.

    Keys are identifiers, values parsed by :func:`parse_value`; the spec then checks each field's type and
    range (:func:`dvt_core.model.specs.check_override`). ArgumentError for anything malformed.
    """
    out = {}
    for item in items or ():
        if not isinstance(item, str) or "=" not in item:
            raise ArgumentError(f"override {_show(item)} is not KEY=VALUE")
        key, value = item.split("=", 1)
        key = key.strip()
        if not _KEY_RE.match(key):
            raise ArgumentError(f"override key {_show(key)} is not a field name")
        out[key] = parse_value(value, f"override {key}")
    return out


# ---- files --------------------------------------------------------------------------------------------

_SPECIAL = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
            (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def check_regular_file(path, what: str = "file", error=InputError, max_bytes: Optional[int] = None) -> os.stat_result:
    """``os.stat`` of ``path`` when it is a regular file of at most ``max_bytes``; ``error`` otherwise.

    A FIFO, device or socket is refused from its ``stat`` alone: it is never opened (opening a FIFO for
    reading blocks until a writer comes).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _SPECIAL if test(st.st_mode)), "special file")
        raise error(f"{what} {path} is a {kind}, not a regular file; refused")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{what} {path} is {st.st_size:,} bytes; refused above {max_bytes:,}")
    return st


def read_bytes(path, what: str = "file", error=InputError, max_bytes: Optional[int] = None) -> bytes:
    """The bytes of a regular file, read with ``read()`` (a file truncated meanwhile gives fewer bytes,
    never SIGBUS), at most ``max_bytes``."""
    check_regular_file(path, what, error, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO swapped in cannot block
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{what} {path} is not a regular file; refused")
        limit = (max_bytes if max_bytes is not None else os.fstat(fd).st_size) + 1
        chunks, total = [], 0
        while total < limit:
            chunk = os.read(fd, min(1 << 24, limit - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if max_bytes is not None and len(data) > max_bytes:
        raise error(f"{what} {path} grew past {max_bytes:,} bytes while being read; refused")
    return data


def resolve_inside(folder, name, where: str, error=ManifestError) -> Path:
    """``folder / name`` for a relative ``name`` that stays inside ``folder`` once every symbolic link is
    resolved; ``error`` naming ``where`` for an absolute path, ``..``, a link leading out, or a non-string."""
    if not isinstance(name, str) or not name or "\x00" in name or len(name) > 1024:
        raise error(f"{where} must be a file name inside the folder, got {_show(name)}")
    rel = Path(name)
    if rel.is_absolute() or name.startswith(("/", "\\")) or ".." in rel.parts or ".." in name.split("\\"):
        raise error(f"{where} {_show(name)} leads outside its folder (absolute or '..'); refused")
    root = Path(folder).resolve()
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise error(f"{where} {_show(name)} resolves to {target}, outside {root}; refused")
    return target


# ---- JSON -------------------------------------------------------------------------------------------

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


def json_depth(text: str) -> int:
    """How deeply ``text``'s arrays and objects nest (strings skipped), without parsing it."""
    depth = deepest = 0
    for ch in re.sub(r"[^\[\]{}]", "", _JSON_STRING.sub("", text)):
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def loads_json(text, where: str, error=InputError, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads`` of at most ``max_bytes`` of text nesting at most ``max_depth`` deep; NaN and
    Infinity refused (they are not JSON)."""
    import json

    if isinstance(text, (bytes, bytearray)):
        if len(text) > max_bytes:
            raise error(f"{where} is {len(text):,} bytes of JSON (at most {max_bytes:,})")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise error(f"{where} is not UTF-8 text") from None
    if not isinstance(text, str):
        raise error(f"{where} is a {type(text).__name__}, not JSON text")
    if len(text) > max_bytes:
        raise error(f"{where} is {len(text):,} characters of JSON (at most {max_bytes:,})")
    if json_depth(text) > max_depth:
        raise error(f"{where} nests deeper than {max_depth} levels; refused")

    def constant(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=constant)
    except (ValueError, RecursionError) as exc:
        raise error(f"{where} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None


def read_json_file(path, what: str = "JSON file", error=InputError, max_bytes: int = MAX_JSON_BYTES):
    """A small JSON file: regular, at most ``max_bytes``, bounded depth."""
    return loads_json(read_bytes(path, what, error, max_bytes), f"{path}", error, max_bytes)


# ---- specs -----------------------------------------------------------------------------------------------

def _field_rule(annotation: str, name: str):
    """A checker for a spec dataclass field from its annotation (they are strings: postponed annotations)."""
    a = annotation.replace(" ", "")
    if a == "bool":
        return lambda v, w, e: want_bool(v, w, e)
    if a == "int":
        return lambda v, w, e: want_int(v, w, -(1 << 20), 1 << 31, e)
    if a == "float":
        return lambda v, w, e: want_float(v, w, error=e)
    if a == "str":
        return lambda v, w, e: want_str(v, w, 128, NAME_RE if name == "name" else None, e)
    if a.startswith("tuple[int"):
        return lambda v, w, e: [want_int(x, f"{w}[{i}]", -(1 << 20), 1 << 20, e)
                                for i, x in enumerate(want_list(v, w, max_len=16, error=e))]
    if a.startswith("tuple[float"):
        return lambda v, w, e: [want_float(x, f"{w}[{i}]", error=e)
                                for i, x in enumerate(want_list(v, w, max_len=MAX_CHANNELS, error=e))]
    return None


def _check_fields(cls, d, where: str, error, nested: dict) -> None:
    want_dict(d, where, error)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, d)) - set(fields))
    if unknown:
        raise error(f"{where} has unknown field(s) {unknown[:5]}")
    for f in fields.values():
        here = f"{where}.{f.name}"
        if f.name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise error(f"{here} is missing")
            continue
        value = d[f.name]
        if f.name in nested:
            nested[f.name](value, here)
            continue
        rule = _field_rule(str(f.type), f.name)
        if rule is not None:
            rule(value, here, error)


def check_spec_dict(d, where: str = "spec", error=CheckpointError):
    """A :class:`~dvt_core.model.specs.CascadeSpec` from an untrusted dict: every field's type checked and
    named, then the spec's own validation and size limits (:func:`check_spec_limits`)."""
    from dvt_core.model.specs import CascadeSpec, StageSpec, T2TSpec

    def stage(s, w):
        _check_fields(StageSpec, s, w, error, {"t2t": lambda t, tw: None if t is None else
                                               _check_fields(T2TSpec, t, tw, error, {})})

    def stages(v, w):
        for i, s in enumerate(want_list(v, w, max_len=MAX_EXITS, error=error)):
            stage(s, f"{w}[{i}]")

    _check_fields(CascadeSpec, d, where, error, {"stages": stages})
    try:
        return CascadeSpec.from_dict(d)
    except DVTError as exc:
        raise error(f"{where}: {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError, OverflowError) as exc:
        raise error(f"{where} does not describe a model ({type(exc).__name__}: {str(exc)[:120]})") from None


def _stage_params(st, reuse_in: int) -> int:
    """Parameters of one stage, roughly (weights of its blocks and tokenizer), for the size limit only."""
    c, hidden = st.embed_dim, int(st.embed_dim * st.mlp_ratio)
    block = 4 * c * c + 2 * c * hidden + reuse_in
    tokens = (st.grid * st.grid + 1) * c
    return st.depth * block + tokens


def check_spec_limits(spec) -> None:
    """SpecError when a spec describes a model too large to build here (widths, depth, tokens, parameters):
    refused before anything is allocated or computed."""
    where = spec.name
    if len(spec.stages) > MAX_EXITS:
        raise SpecError(f"{where}: {len(spec.stages)} exits (at most {MAX_EXITS})")
    check_name(spec.name, "spec name")
    for key, value, high in (("num_classes", spec.num_classes, MAX_CLASSES), ("img_size", spec.img_size, MAX_IMG_SIZE),
                             ("in_chans", spec.in_chans, MAX_CHANNELS)):
        want_int(value, f"{where}: {key}", 1, high, SpecError)
    for key in ("mean", "std"):
        for v in getattr(spec, key):
            want_float(v, f"{where}: {key}", error=SpecError)
    for v in spec.std:
        want_float(v, f"{where}: std", 0.0, low_open=True, error=SpecError)
    for key in ("feature_reuse_dim", "feature_reuse_hidden", "relation_reuse_expand"):
        want_int(getattr(spec, key), f"{where}: {key}", 1, MAX_WIDTH, SpecError)
    want_float(spec.drop_path_rate, f"{where}: drop_path_rate", 0.0, 1.0, high_open=True, error=SpecError)
    total = 0
    for i, st in enumerate(spec.stages):
        here = f"{where} stage {i}"
        want_int(st.embed_dim, f"{here}: embed_dim", 1, MAX_WIDTH, SpecError)
        want_int(st.depth, f"{here}: depth", 1, MAX_DEPTH, SpecError)
        want_int(st.num_heads, f"{here}: num_heads", 1, MAX_HEADS, SpecError)
        want_int(st.grid, f"{here}: grid", 1, int(math.isqrt(MAX_TOKENS)), SpecError)
        want_float(st.mlp_ratio, f"{here}: mlp_ratio", 0.0, 64.0, low_open=True, error=SpecError)
        want_float(st.ln_eps, f"{here}: ln_eps", 0.0, 1.0, low_open=True, error=SpecError)
        if st.t2t is not None:
            want_int(st.t2t.token_dim, f"{here}: token_dim", 1, MAX_WIDTH, SpecError)
            want_float(st.t2t.kernel_ratio, f"{here}: kernel_ratio", 0.0, 16.0, low_open=True, error=SpecError)
            for key in ("kernels", "strides"):
                for v in getattr(st.t2t, key):
                    want_int(v, f"{here}: t2t {key}", 1, MAX_IMG_SIZE, SpecError)
            for v in st.t2t.paddings:
                want_int(v, f"{here}: t2t paddings", 0, MAX_IMG_SIZE, SpecError)
        elif st.family == "vit":
            want_int(st.patch_kernel, f"{here}: patch_kernel", 1, MAX_IMG_SIZE, SpecError)
            want_int(st.patch_stride, f"{here}: patch_stride", 1, MAX_IMG_SIZE, SpecError)
            want_int(st.patch_padding, f"{here}: patch_padding", 0, MAX_IMG_SIZE, SpecError)
        total += _stage_params(st, spec.feature_reuse_hidden * spec.feature_reuse_dim)
    if total > MAX_PARAMS:
        raise SpecError(f"{where}: about {total:,} parameters; refused above {MAX_PARAMS:,} (a smaller embed_dim, "
                        "depth or grid)")


# ---- checkpoint metadata ------------------------------------------------------------------------------

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


def _check_train(value, where: str, error) -> None:
    from dvt_core.training.config import TrainConfig

    want_dict(value, where, error)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    check_train_config(TrainConfig.from_dict({k: v for k, v in value.items() if k in known}), where, error)


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
        raise error(f"{where}.version is {_show(value.get('version'))}; this dvt reads cost profiles of version "
                    f"{COST_PROFILE_VERSION} (measure again with `dvt profile`)")
    for key in ("runtime", "precision"):
        want_str(value.get(key), f"{where}.{key}", 32, error=error)
    if value.get("threads") is not None:
        want_int(value["threads"], f"{where}.threads", 1, 4096, error)
    machine = want_dict(value.get("machine") or {}, f"{where}.machine", error)
    for key, v in machine.items():
        if isinstance(v, dict):
            for k, x in v.items():
                want_str(x, f"{where}.machine.{key}.{_show(k, 32)}", 256, error=error)
        elif v is not None and not isinstance(v, (bool, int)):
            want_str(v, f"{where}.machine.{key}", 256, error=error)
    seen = set()
    for i, row in enumerate(want_list(value.get("batches"), f"{where}.batches", max_len=MAX_PROFILE_BATCHES,
                                      error=error)):
        here = f"{where}.batches[{i}]"
        want_dict(row, here, error)
        batch = want_int(row.get("batch"), f"{here}.batch", 1, MAX_BENCH_BATCH, error)
        if batch in seen:
            raise error(f"{here}.batch {batch} is measured twice")
        seen.add(batch)
        for j, ms in enumerate(want_list(row.get("stage_ms"), f"{here}.stage_ms", exits, error=error)):
            want_float(ms, f"{here}.stage_ms[{j}]", 0.0, MAX_STAGE_MS, low_open=True, error=error)
        if row.get("static_ms") is not None:
            want_float(row["static_ms"], f"{here}.static_ms", 0.0, MAX_STAGE_MS, low_open=True, error=error)
        for key in ("overhead_ms", "total_ms"):
            if row.get(key) is not None:
                want_float(row[key], f"{here}.{key}", 0.0, MAX_STAGE_MS, error=error)
        if row.get("stage_call_ms") is not None:  # a fixed cost per call is at most the stage's whole call
            for j, ms in enumerate(want_list(row["stage_call_ms"], f"{here}.stage_call_ms", len(row["stage_ms"]),
                                             error=error)):
                want_float(ms, f"{here}.stage_call_ms[{j}]", 0.0, row["stage_ms"][j] * batch * (1 + 1e-9),
                           error=error)
    if not seen:
        raise error(f"{where}.batches is empty: no batch size was measured")
    return value


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
    "train": lambda v, w, e, n: _check_train(v, w, e),
    "cost_profile": check_cost_profile,
}


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


# ---- training and command-line numbers ----------------------------------------------------------------------

def check_train_config(cfg, where: str = "training", error=ArgumentError):
    """``cfg`` (a :class:`~dvt_core.training.config.TrainConfig`) if its own rules
    (:meth:`~dvt_core.training.config.TrainConfig.validate`, the one set) pass; else ``error`` saying
    ``where`` and the rule broken. Returns ``cfg``."""
    from dvt_core.errors import ConfigError

    try:
        return cfg.validate()
    except ConfigError as exc:
        raise error(f"{where}: {exc}") from None


def number(kind: str = "float", low=None, high=None, low_open: bool = False, high_open: bool = False):
    """An argparse ``type=``: a finite int or float within the bounds, else argparse's one-line error.

    ``number("float", 0, low_open=True)`` accepts 0.5 and refuses 0, -1, ``inf`` and ``nan``.
    """
    def parse(text: str):
        try:
            value = float(text) if kind == "float" else None
            if kind == "int":
                if not _INT_RE.match(text.strip()):
                    raise ValueError
                value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole number' if kind == 'int' else 'number'}") \
                from None
        try:
            if kind == "int":
                return want_int(value, "value", low, high, ArgumentError)
            return want_float(value, "value", low, high, low_open, high_open, ArgumentError)
        except ArgumentError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("value ", "", 1)) from None

    parse.__name__ = kind  # argparse names the type in its message
    return parse


# ---- export manifests -----------------------------------------------------------------------------------

def _check_stage_entry(st, i: int, directory: Path, where: str, expect_inputs: list, n_outputs: int) -> None:
    here = f"{where}: stages[{i}]"
    want_dict(st, here, ManifestError)
    if st.get("index", i) != i:
        raise ManifestError(f"{here}.index is {_show(st.get('index'))}, not {i}")
    resolve_inside(directory, st.get("file"), f"{here}.file")
    sha = st.get("sha256")
    if not isinstance(sha, str) or not HEX64_RE.match(sha):
        raise ManifestError(f"{here}.sha256 is not a SHA-256 (64 lowercase hex digits): {_show(sha)}")
    inputs = [want_str(x, f"{here}.inputs", 64, error=ManifestError)
              for x in want_list(st.get("inputs"), f"{here}.inputs", max_len=8, error=ManifestError)]
    outputs = [want_str(x, f"{here}.outputs", 64, error=ManifestError)
               for x in want_list(st.get("outputs"), f"{here}.outputs", max_len=8, error=ManifestError)]
    if inputs != expect_inputs:
        raise ManifestError(f"{here}.inputs is {inputs}; the spec needs {expect_inputs}")
    if len(outputs) != n_outputs:
        raise ManifestError(f"{here}.outputs names {len(outputs)} outputs; the spec needs {n_outputs}")


def check_manifest(m, directory, where: str, formats, kind: str, version: int) -> dict:
    """An export manifest (parsed ``dvt.json``) checked field by field against its own spec: the format,
    every stage's file (inside ``directory``), SHA-256, inputs and outputs, the exit MACs, thresholds,
    batch axes, class names and metadata. Returns ``m`` with ``m["_spec"]`` the validated spec."""
    from dvt_core.export.manifest import FEATURES, PREV, RELATIONS, carry_names
    from dvt_core.model.macs import exit_macs

    directory = Path(directory)
    if not isinstance(m, dict) or m.get("format") != kind:
        raise InputError(f"{where} is not a dvt export manifest")
    if m.get("format_version") != version:
        raise ManifestError(f"{where}: manifest version {_show(m.get('format_version'))} is not supported "
                            f"(this dvt reads {version})")
    if m.get("graph_format") not in formats:
        raise ManifestError(f"{where}: graph_format {_show(m.get('graph_format'))} is not one of {', '.join(formats)}")
    check_name(m.get("model"), f"{where}: model", ManifestError)
    spec = check_spec_dict(m.get("spec"), f"{where}: spec", ManifestError)
    if spec.name != m["model"]:
        raise ManifestError(f"{where}: its spec is of {spec.name}, its model field says {m['model']}")
    n = spec.num_exits
    stages = want_list(m.get("stages"), f"{where}: stages", n, error=ManifestError)
    carried = []
    for i, st in enumerate(stages):
        expect = ["images"] + [PREV + c for c in carried]
        carried = carry_names(spec, i)
        _check_stage_entry(st, i, directory, where, expect, 1 + len(carried))
    for j, extra in enumerate(want_list(m.get("data_files") or [], f"{where}: data_files", max_len=1024,
                                        error=ManifestError)):
        want_dict(extra, f"{where}: data_files[{j}]", ManifestError)
        resolve_inside(directory, extra.get("file"), f"{where}: data_files[{j}].file")
        if not isinstance(extra.get("sha256"), str) or not HEX64_RE.match(extra["sha256"]):
            raise ManifestError(f"{where}: data_files[{j}].sha256 is not a SHA-256 (64 lowercase hex digits)")
    macs = [want_int(x, f"{where}: exit_macs[{i}]", 0, 1 << 62, ManifestError)
            for i, x in enumerate(want_list(m.get("exit_macs"), f"{where}: exit_macs", n, error=ManifestError))]
    if macs != [int(x) for x in exit_macs(spec)]:
        raise ManifestError(f"{where}: exit_macs {macs} are not the spec's {[int(x) for x in exit_macs(spec)]}")
    for key, want in (("img_size", spec.img_size), ("in_chans", spec.in_chans), ("num_classes", spec.num_classes),
                      ("mean", list(spec.mean)), ("std", list(spec.std))):
        if key in m and m[key] != want:
            raise ManifestError(f"{where}: {key} is {_show(m[key])}, the spec says {want}")
    axes = want_dict(m.get("batch_axes") or {}, f"{where}: batch_axes", ManifestError)
    for key, axis in axes.items():
        if key not in (FEATURES, RELATIONS):
            raise ManifestError(f"{where}: batch_axes names {_show(key)}, not {FEATURES} or {RELATIONS}")
        want_int(axis, f"{where}: batch_axes.{key}", 0, 1, ManifestError)
    meta = m.get("checkpoint_meta") or {}
    check_checkpoint_meta(meta, f"{where}: checkpoint_meta", ManifestError)
    top = {k: m.get(k) for k in META_RULES if m.get(k) is not None}
    check_checkpoint_meta({"spec": m["spec"], **top}, where, ManifestError)
    if m.get("classes") is not None and len(m["classes"]) != spec.num_classes:
        raise ManifestError(f"{where}: classes names {len(m['classes'])} classes, the spec has {spec.num_classes}")
    m["_spec"] = spec
    return m


def manifest_files(m: dict, directory) -> list[tuple[Path, str, str]]:
    """``(path, sha256, where)`` of every file an export reads (its graphs and their external data), each
    resolved inside ``directory`` (call after :func:`check_manifest`)."""
    out = [(resolve_inside(directory, st["file"], f"stages[{i}].file"), st["sha256"], f"stages[{i}]")
           for i, st in enumerate(m["stages"])]
    out += [(resolve_inside(directory, extra["file"], f"data_files[{j}].file"), extra["sha256"], f"data_files[{j}]")
            for j, extra in enumerate(m.get("data_files") or [])]
    return out


def check_no_unlisted_files(directory, listed, manifest_name: str) -> None:
    """ManifestError for a file in the export folder that the manifest does not cover with a hash (a graph's
    external data put beside it, a symbolic link): a runtime may read what sits beside a graph."""
    directory = Path(directory)
    covered = {Path(p).resolve() for p in listed} | {(directory / manifest_name).resolve()}
    for root, dirs, files in os.walk(directory):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = Path(root) / name
            if p.is_symlink() and p.resolve() not in covered:
                raise ManifestError(f"{directory}: {p.relative_to(directory)} is a symbolic link the manifest does "
                                    "not cover; refused")
            if p.resolve() not in covered:
                raise ManifestError(f"{directory}: {p.relative_to(directory)} is not covered by {manifest_name}'s "
                                    "SHA-256 list (a runtime could read it); refused")

