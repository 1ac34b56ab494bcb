"""Where untrusted input becomes trusted: the generic checkers every reader of outside values calls.

Checkpoint metadata, an export's ``dvt.json``, spec dictionaries, ``-O KEY=VALUE`` overrides and
command-line numbers come from files and people the project does not control. The rules of each live
beside what they check (a spec's in ``dvt_core.model``, a checkpoint's metadata in
``dvt_core.checkpoint.metadata``, the training record in ``dvt_core.training.config``, the manifest's in
``dvt_core.export.manifest``); they are written with the checkers below, which:

* cap the size before parsing (bytes of a file, characters of a value, nesting depth of JSON);
* refuse special files (FIFO, device, socket) from ``stat`` alone, never opening them for reading;
* check type, range and length of every field the code later uses, raising a :class:`DVTError`
  subclass whose message names the field (``dvt.json: stages[1].sha256 is not ...``);
* resolve every path a file names inside its folder (no absolute path, no ``..``, no symbolic link out).

Nothing here imports a framework or another part of dvt_core but its errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import stat
from pathlib import Path
from typing import Optional

from dvt_core.errors import ArgumentError, InputError, ManifestError, SpecError

# ---- limits -------------------------------------------------------------------------------------------
MAX_JSON_BYTES = 8 << 20          # a manifest or a metadata string: it describes a model, it never holds one
MAX_JSON_DEPTH = 32
MAX_OVERRIDE_CHARS = 4096
MAX_LIST = 65536                  # items of any one list in metadata (classes, budgets, ...)
MAX_CLASS_NAME = 512
MAX_CLASSES = 1_000_000
MAX_TUPLE = 16                    # items of a tuple field of a dataclass (grids, channels' mean / std)
MAX_SEED = 2 ** 32 - 1
MAX_BENCH_BATCH = 4096            # images of one timed batch (4096 RGB 224x224 images are 2.4 GB)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def show_value(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- plain values ------------------------------------------------------------------------------------

def want_int(value, where: str, low: Optional[int] = None, high: Optional[int] = None, error=InputError) -> int:
    """``value`` as an int (a whole float such as 3.0 accepted, a bool refused) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise error(f"{where} must be a whole number, got {show_value(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise error(f"{where} must lie in [{low if low is not None else '-inf'}, "
                    f"{high if high is not None else 'inf'}], got {value}")
    return value


def want_float(value, where: str, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False, high_open: bool = False, error=InputError) -> float:
    """``value`` as a finite float within its bounds (``*_open``: the bound itself excluded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{where} must be a number, got {show_value(value)}")
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
        raise error(f"{where} {show_value(value)} is not a plain name (letters, digits, '.', '_', '+', '-'; "
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
        raise error(f"{where} must be true or false, got {show_value(value)}")
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
        raise ArgumentError(f"{where}: unbalanced or nested brackets in {show_value(text)} (a list is [a, b, c])")
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
            raise ArgumentError(f"{where}: unbalanced brackets in {show_value(text)} (a list is [a, b, c])")
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
            raise ArgumentError(f"override {show_value(item)} is not KEY=VALUE")
        key, value = item.split("=", 1)
        key = key.strip()
        if not _KEY_RE.match(key):
            raise ArgumentError(f"override key {show_value(key)} is not a field name")
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
        raise error(f"{where} must be a file name inside the folder, got {show_value(name)}")
    rel = Path(name)
    if rel.is_absolute() or name.startswith(("/", "\\")) or ".." in rel.parts or ".." in name.split("\\"):
        raise error(f"{where} {show_value(name)} leads outside its folder (absolute or '..'); refused")
    root = Path(folder).resolve()
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise error(f"{where} {show_value(name)} resolves to {target}, outside {root}; refused")
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


# ---- typed fields of a dataclass --------------------------------------------------------------------------

def _field_rule(annotation: str, name: str):
    """A checker for a dataclass field from its annotation (they are strings: postponed annotations)."""
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
                                for i, x in enumerate(want_list(v, w, max_len=MAX_TUPLE, error=e))]
    if a.startswith("tuple[float"):
        return lambda v, w, e: [want_float(x, f"{w}[{i}]", error=e)
                                for i, x in enumerate(want_list(v, w, max_len=MAX_TUPLE, error=e))]
    return None


def check_fields(cls, d, where: str, error, nested: dict) -> None:
    """``d`` (an untrusted dict) against dataclass ``cls``: no unknown field, every required one present,
    each value of its annotated type (bool, int, float, str, tuples of them) or checked by ``nested[name]``."""
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


# ---- command-line numbers ------------------------------------------------------------------------------------


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


