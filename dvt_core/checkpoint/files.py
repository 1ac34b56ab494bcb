"""Reading and writing checkpoints in every format DVT meets, recognised from the content.

Formats:
* ``official``    the authors' release ``*.pth.tar``: a torch pickle with ``model_state_dict`` and
                  the metadata ``flops``, ``anytime_classification``, ``dynamic_threshold``,
                  ``budgeted_batch_classification``;
* ``torch``       a torch file holding a state dict, or ``{"state_dict": ..., "dvt_meta": ...}``;
* ``safetensors`` the neutral format: canonical names, metadata as JSON under ``dvt``;
* ``mindspore``   a MindSpore ``.ckpt`` (MindSpore parameter names, metadata as JSON under ``dvt_meta``).

Torch files are read with ``torch.load(..., weights_only=True)``: a pickle that would run code is
refused, never executed. MindSpore files are decoded here (dvt_core.checkpoint.ms_ckpt), every tensor's byte
length checked against its dims and dtype, without MindSpore. Metadata is bounded in size and type.
Every writer goes through dvt_core.fileio.atomic_write (temporary file, fsync, create-without-replace
unless forced), so a failure leaves no half-written file. Tensors travel as numpy arrays; frameworks
are imported only when a file of theirs appears.

:func:`check_state` compares tensors with a spec (names and shapes, or at least the parameter count)
before any model is allocated, refuses NaN / inf and lossy dtype casts, and lists lossless ones.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from dvt_core import fileio, schema
from dvt_core.checkpoint import ms_ckpt as ckpt_format
from dvt_core.checkpoint.metadata import check_checkpoint_meta
from dvt_core.checkpoint.dtypes import WidenedArray, bf16_to_float32, refuse_dtype, widened  # noqa: F401
from dvt_core.errors import CheckpointError, CheckpointWarning, InputError, UnsafeCheckpointError
from dvt_core.runtimes import import_runtime
from dvt_core.checkpoint.naming import (canonical_to_mindspore, canonical_to_ms_official, is_ms_official_layout, is_ms_training_state,
                     is_official_layout, mindspore_to_canonical, ms_official_to_canonical, rename_official)
from dvt_core.model.shapes import check_spec_state
from dvt_core.model.specs import CascadeSpec
from dvt_core.model.zoo import get_spec

OFFICIAL_META_KEYS = ("flops", "anytime_classification", "dynamic_threshold", "budgeted_batch_classification")
FORMATS = ("official", "torch", "safetensors", "mindspore")
#: Writable formats: this project's three, plus the layout of the authors' MindSpore code (a .ckpt).
WRITE_FORMATS = ("torch", "safetensors", "mindspore", "mindspore-official")
# Bounds on metadata: it describes a model, it never holds one.
META_MAX_ARRAY = 65536        # elements of one array turned into a list
META_MAX_ITEMS = 1_000_000    # values in all the metadata together
META_MAX_DEPTH = 16
META_MAX_STRING = 4 << 20     # characters of one string (the JSON metadata itself included)
PICKLE_SCAN_MAX = 64 << 20    # bytes of the one pickle entry the safety rescan reads
# Suffixes that name a format (a writer refuses a contradicting one); others (.bin, none) are neutral.
SUFFIX_FORMATS = ((".safetensors", "safetensors"), (".ckpt", "mindspore"), (".pth.tar", "torch"),
                  (".pth", "torch"), (".pt", "torch"))


MAX_TENSORS = 65536           # tensors of one checkpoint (a DVT has about a thousand)
ZIP_EXPANSION = 2             # a torch zip may hold at most this many times its size, plus ZIP_SLACK, unpacked
ZIP_SLACK = 1 << 20
TORCH_PICKLE_MAX = 16 << 20   # data.pkl of a torch zip: names, tensor records, metadata (a DVT's is ~100 kB)
SAFETENSORS_MAX_HEADER = 16 << 20
# safetensors dtype names -> numpy; BF16 is widened to float32 (lossless); F8_* and complex are refused by name
SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


META_ENTRY = "dvt_meta"  # the entry of a torch or MindSpore file that holds the metadata as JSON


@dataclass
class Checkpoint:
    """Tensors as numpy arrays plus metadata. ``layout`` says how the names are spelled."""

    state: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = "torch"
    layout: str = "canonical"  # "canonical", "official" (PyTorch release) or "ms_official" (MindSpore release)
    path: Optional[str] = None

    def canonical_state(self, num_exits: int, in_chans: int = 3) -> dict[str, np.ndarray]:
        """The tensors under canonical names (official keys renamed for a ``num_exits`` cascade).

        Two source names that map to one canonical name are refused (neither silently wins).
        """
        if self.layout == "official":
            renamed = rename_official(self.state, num_exits)
            if len(renamed) != len(self.state):
                from dvt_core.checkpoint.naming import official_to_canonical

                seen: dict[str, str] = {}
                for k in self.state:
                    c = official_to_canonical(k)
                    if c in seen:
                        raise CheckpointError(f"{self.path}: {seen[c]!r} and {k!r} both name the weight {c!r}")
                    seen[c] = k
                raise CheckpointError(f"{self.path}: several names map to one weight")
            return renamed
        if self.layout == "ms_official":
            return ms_official_to_canonical(self.state, in_chans)
        return dict(self.state)

    @property
    def arch(self) -> Optional[str]:
        return self.meta.get("arch")


def _framework_files(name: str, path, action: str = "reading"):
    """The framework ``name`` (its runtime), whose ``read_file`` / ``write_file`` handle its own files;
    imported only now."""
    try:
        return import_runtime(name).RUNTIME
    except InputError:
        raise CheckpointError(f"{path} is a {name} checkpoint; {action} it needs {name} "
                              f"(pip install 'dvt[{name}]')") from None


# ---- format detection -----------------------------------------------------------------------------

def sniff_format(path) -> str:
    """'torch', 'safetensors' or 'mindspore' from the first bytes; CheckpointError for anything else."""
    p = Path(path)
    if not os.path.exists(p):
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory, not a checkpoint file")
    schema.check_regular_file(p, "checkpoint", CheckpointError)  # a FIFO or device is never opened
    with open(p, "rb") as fh:
        head = fh.read(64)
    if len(head) == 0:
        raise CheckpointError(f"{p} is empty, not a checkpoint")
    if head.startswith(b"PK\x03\x04"):
        return "torch"  # torch's zip serialisation
    if head[:1] == b"\x80" and len(head) > 1 and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch"  # legacy pickle
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if ckpt_format.is_ckpt(head):  # protobuf Checkpoint.value, whose first field is the tag
        return "mindspore"
    raise CheckpointError(f"{p} is not a checkpoint this project reads (torch .pth/.pth.tar, .safetensors, "
                          f"MindSpore .ckpt); its first bytes are {head[:8]!r}")


def resolve_spec(name_or_spec: Union[str, CascadeSpec, None], ckpt: Optional[Checkpoint], **overrides) -> CascadeSpec:
    """The spec to build: the checkpoint's own when it carries one, else the zoo entry; plus overrides."""
    meta_spec = (ckpt.meta or {}).get("spec") if ckpt is not None else None
    if meta_spec is not None:
        saved = CascadeSpec.from_dict(meta_spec)
        wanted = name_or_spec.name if isinstance(name_or_spec, CascadeSpec) else name_or_spec
        arch = ckpt.meta.get("arch", saved.name)
        if wanted is not None and wanted not in (arch, saved.name):
            raise CheckpointError(f"{ckpt.path} holds weights of {arch}, not {wanted}")
        return get_spec(saved, **overrides)
    if name_or_spec is None:
        raise InputError("name a model (its checkpoint carries no architecture)")
    return get_spec(name_or_spec, **overrides)


def read_checkpoint(path) -> Checkpoint:
    """Read any supported checkpoint file into a :class:`Checkpoint`."""
    fmt = sniff_format(path)
    reader = {"torch": _read_torch, "safetensors": _read_safetensors, "mindspore": _read_mindspore}[fmt]
    ckpt = reader(Path(path))
    ckpt.path = str(path)
    if len(ckpt.state) > MAX_TENSORS:
        raise CheckpointError(f"{path} holds {len(ckpt.state)} tensors (at most {MAX_TENSORS})")
    check_checkpoint_meta(ckpt.meta, f"{path}: metadata", CheckpointError)
    return ckpt


# ---- torch -----------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _pickle_payloads(path: Path) -> list[bytes]:
    """The pickle bytes of a torch file: the one ``data.pkl`` inside the zip, or the raw file.

    At most :data:`PICKLE_SCAN_MAX` bytes are read (decompressed); a larger entry is refused.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(names) != 1:
                raise CheckpointError(f"{path}: a torch zip holds one data.pkl; this one holds {len(names)}")
            info = zf.getinfo(names[0])
            if info.file_size > PICKLE_SCAN_MAX:
                raise CheckpointError(f"{path}: its pickle is {info.file_size} bytes (at most {PICKLE_SCAN_MAX})")
            with zf.open(info) as fh:
                data = fh.read(PICKLE_SCAN_MAX + 1)
            if len(data) > PICKLE_SCAN_MAX:
                raise CheckpointError(f"{path}: its pickle exceeds {PICKLE_SCAN_MAX} bytes")
            return [data]
    if path.stat().st_size > PICKLE_SCAN_MAX:
        raise CheckpointError(f"{path}: a legacy pickle over {PICKLE_SCAN_MAX} bytes; not scanned")
    return [path.read_bytes()]


def _referenced_globals(path: Path) -> Optional[list[str]]:
    """Globals a pickle would import, read with pickletools (nothing is executed); None if unreadable."""
    import pickletools

    found = []
    try:
        for payload in _pickle_payloads(path):
            strings = []
            for op, arg, _ in pickletools.genops(payload):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "STRING", "BINSTRING"):
                    strings.append(str(arg))
                elif op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
    except CheckpointError:
        raise
    except Exception:  # truncated or not a pickle: the caller reports corruption
        return None
    return found


def check_torch_zip(path: Path) -> None:
    """Before torch sees a zip: at most :data:`MAX_TENSORS` entries, and at most :data:`ZIP_EXPANSION` times
    the file's size (plus :data:`ZIP_SLACK`) once unpacked (torch writes entries stored, not compressed),
    so a small compressed file cannot unpack into gigabytes."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt: {exc})") from None
    if len(infos) > MAX_TENSORS + 16:
        raise CheckpointError(f"{path} holds {len(infos)} zip entries (at most {MAX_TENSORS + 16})")
    pickles = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
    if any(i.file_size > TORCH_PICKLE_MAX for i in pickles):
        raise CheckpointError(f"{path}: its pickle is {max(i.file_size for i in pickles):,} bytes (at most "
                              f"{TORCH_PICKLE_MAX:,}): a state dict's names and metadata are far smaller")
    unpacked = sum(max(i.file_size, 0) for i in infos)
    if unpacked > ZIP_EXPANSION * size + ZIP_SLACK:
        raise CheckpointError(f"{path} would unpack to {unpacked:,} bytes from {size:,}: refused as a "
                              "decompression bomb (torch writes checkpoints uncompressed)")


def torch_load(path: Path):
    import pickle

    if zipfile.is_zipfile(path):
        check_torch_zip(path)
    files = _framework_files("torch", path)
    try:
        return files.read_file(path)  # torch.load(..., weights_only=True), tensors as numpy
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        text = _ANSI.sub("", str(exc))
        blocked = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        refs = _referenced_globals(path)
        foreign = [g for g in (refs or []) if not g.startswith(("torch.", "collections.OrderedDict", "numpy."))]
        if blocked or foreign:
            what = blocked.group(1) if blocked else ", ".join(sorted(set(foreign))[:3])
            raise UnsafeCheckpointError(
                f"{path}: refused to load: its pickle would import {what}, which is code, not weights "
                "(only tensors and plain data are ever unpickled)") from None
        first = next((ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln), "")
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt"
                              f"{': ' + first if first else ''})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = _ANSI.sub("", str(exc)).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt: {first})") from None


def to_numpy_state(d: dict, path: Path) -> dict[str, np.ndarray]:
    out = {}
    for k, v in d.items():
        if not isinstance(k, str) or not isinstance(v, np.ndarray):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; "
                                  "this does not look like a state dict")
        out[k] = v
    return out


def _plain(obj, where: str = "metadata", _depth: int = 0, _count: Optional[list] = None):
    """Metadata as JSON-friendly Python values (small numpy arrays become lists).

    Bounded: an array of more than :data:`META_MAX_ARRAY` elements, a string longer than
    :data:`META_MAX_STRING`, nesting deeper than :data:`META_MAX_DEPTH`, more than
    :data:`META_MAX_ITEMS` values in all, or a value that is not plain data raise CheckpointError
    before anything large is built.
    """
    count = _count if _count is not None else [0]
    count[0] += 1
    if count[0] > META_MAX_ITEMS or _depth > META_MAX_DEPTH:
        raise CheckpointError(f"{where} is too large or too deeply nested to be metadata")
    if isinstance(obj, np.ndarray):
        if obj.size > META_MAX_ARRAY or obj.dtype.kind not in "biuf":
            raise CheckpointError(f"{where} holds a {obj.dtype} array of shape {obj.shape}: "
                                  f"metadata arrays have at most {META_MAX_ARRAY} numbers")
        count[0] += obj.size
        return _plain(obj.tolist(), where, _depth, count) if obj.ndim else obj.item()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _plain(v, f"{where}[{str(k)[:40]!r}]", _depth + 1, count) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if len(obj) > META_MAX_ITEMS:
            raise CheckpointError(f"{where} holds a list of {len(obj)} values")
        return [_plain(v, where, _depth + 1, count) for v in obj]
    if isinstance(obj, str):
        if len(obj) > META_MAX_STRING:
            raise CheckpointError(f"{where} holds a string of {len(obj)} characters")
        return obj
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    raise CheckpointError(f"{where} holds a {type(obj).__name__}, which is not plain metadata")


def _json_meta(text, where: str) -> dict:
    if not isinstance(text, str):
        raise CheckpointError(f"{where} is a {type(text).__name__}, not a JSON string")
    if len(text) > META_MAX_STRING:
        raise CheckpointError(f"{where} is {len(text)} characters of JSON (at most {META_MAX_STRING})")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{where} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} is a JSON {type(meta).__name__}, not an object")
    return _plain(meta, where)


def _read_torch(path: Path) -> Checkpoint:
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a DVT checkpoint")
    if "model_state_dict" in obj:  # the official release
        if not isinstance(obj["model_state_dict"], dict):
            raise CheckpointError(f"{path}: its model_state_dict is a {type(obj['model_state_dict']).__name__}, "
                                  "not a mapping of names to tensors")
        state = to_numpy_state(obj["model_state_dict"], path)
        meta = {k: _plain(obj[k], f"{path}: metadata {k!r}") for k in OFFICIAL_META_KEYS if k in obj}
        layout = "official" if is_official_layout(state) else "canonical"
        return Checkpoint(state, meta, "official", layout)
    if "state_dict" in obj and not isinstance(obj["state_dict"], dict):
        raise CheckpointError(f"{path}: its state_dict is a {type(obj['state_dict']).__name__}, "
                              "not a mapping of names to tensors")
    if "state_dict" in obj:
        state = to_numpy_state(obj["state_dict"], path)
        raw = obj.get("dvt_meta", "{}")
        meta = _json_meta(raw, f"{path}: metadata 'dvt_meta'") if isinstance(raw, str) else \
            _plain(raw, f"{path}: metadata 'dvt_meta'")
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: metadata 'dvt_meta' is not a mapping")
    else:
        state = to_numpy_state(obj, path)
        meta = {}
    layout = "official" if is_official_layout(state) else "canonical"
    return Checkpoint(state, meta, "torch", layout)


# ---- safetensors -------------------------------------------------------------------------------------

def _safetensors_header(fd: int, path: Path, size: int) -> tuple[dict, dict, int]:
    """``(entries, metadata, data start)`` of a safetensors file, every entry checked against the file's
    size before any tensor is read: dtype, shape, offsets, count."""
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated header)")
    n = int.from_bytes(head, "little")
    if n > SAFETENSORS_MAX_HEADER or n > size - 8:
        raise CheckpointError(f"{path}: its safetensors header claims {n:,} bytes (at most "
                              f"{min(SAFETENSORS_MAX_HEADER, size - 8):,}); truncated or hostile")
    header = schema.loads_json(os.pread(fd, n, 8), f"{path}: its safetensors header", CheckpointError,
                               max_bytes=SAFETENSORS_MAX_HEADER, max_depth=4)
    schema.want_dict(header, f"{path}: its safetensors header", CheckpointError)
    meta = header.pop("__metadata__", None) or {}
    schema.want_dict(meta, f"{path}: its safetensors __metadata__", CheckpointError)
    if len(header) > MAX_TENSORS:
        raise CheckpointError(f"{path} holds {len(header)} tensors (at most {MAX_TENSORS})")
    data_size, spans = size - 8 - n, []
    for name, e in header.items():
        where = f"{path}: tensor {name[:80]!r}"
        schema.want_dict(e, where, CheckpointError)
        dtype = e.get("dtype")
        if dtype not in SAFETENSORS_DTYPES:
            refuse_dtype(where, f"dtype {str(dtype)[:20]}")
        shape = [schema.want_int(d, f"{where} shape", 0, 1 << 40, CheckpointError)
                 for d in schema.want_list(e.get("shape"), f"{where} shape", max_len=8, error=CheckpointError)]
        offsets = [schema.want_int(o, f"{where} data_offsets", 0, data_size, CheckpointError)
                   for o in schema.want_list(e.get("data_offsets"), f"{where} data_offsets", 2, error=CheckpointError)]
        want = int(np.prod(shape, dtype=object)) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != want:
            raise CheckpointError(f"{where}: its offsets span {offsets[1] - offsets[0]} bytes, its shape {shape} "
                                  f"of {dtype} needs {want}")
        spans.append(tuple(offsets))
    spans.sort()
    if any(b < a_end for (_, a_end), (b, _) in zip(spans, spans[1:])):
        raise CheckpointError(f"{path}: two tensors share bytes; not a valid safetensors file")
    return header, meta, 8 + n


def _read_safetensors(path: Path) -> Checkpoint:
    """Parsed here with every offset checked first; tensors read with ``pread`` into arrays they own (no
    mmap: a file truncated meanwhile is an error, never SIGBUS)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        size = os.fstat(fd).st_size
        try:
            header, meta, start = _safetensors_header(fd, path, size)
        except CheckpointError as exc:  # say first what the file is not, then the field at fault
            detail = str(exc).replace(f"{path}: ", "", 1).replace(str(path), "it", 1)
            raise CheckpointError(f"{path} is not a readable safetensors file ({detail})") from None
        state = {}
        for name, e in header.items():
            dt = np.dtype(SAFETENSORS_DTYPES[e["dtype"]])
            b, end = e["data_offsets"]
            raw = os.pread(fd, end - b, start + b)
            if len(raw) != end - b:
                raise CheckpointError(f"{path}: tensor {name[:80]!r} is truncated (the file shrank while read)")
            a = np.frombuffer(raw, dtype=dt).reshape(e["shape"])
            state[name] = bf16_to_float32(a) if e["dtype"] == "BF16" else a.astype(dt.newbyteorder("="))
    except OSError as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    meta_raw = meta.get("dvt", "{}")
    meta = _json_meta(meta_raw, f"{path}: its 'dvt' metadata")
    layout = "official" if is_official_layout(state) else "canonical"
    return Checkpoint(state, meta, "safetensors", layout)


# ---- MindSpore -------------------------------------------------------------------------------------

MINDSPORE_META_KEY = META_ENTRY  # the append_dict entry holding the JSON metadata


def _read_mindspore(path: Path) -> Checkpoint:
    """Decoded and validated by dvt_core.checkpoint.ms_ckpt: MindSpore is neither needed nor called."""
    tensors, strings = ckpt_format.read_ckpt(path)
    meta = _json_meta(strings[MINDSPORE_META_KEY], f"{path}: its {MINDSPORE_META_KEY!r} metadata") \
        if MINDSPORE_META_KEY in strings else {}
    if is_ms_official_layout(tensors):
        return _ms_official_checkpoint(tensors)
    state: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    for name, value in tensors.items():
        if value.ndim == 0 and name in ("epoch_num", "step_num", "global_step"):
            continue  # MindSpore's own append_dict counters, not weights
        key = mindspore_to_canonical(name)
        if key in state:
            raise CheckpointError(f"{path}: {source[key]!r} and {name!r} both name the weight {key!r}")
        state[key], source[key] = value, name
    return Checkpoint(state, meta, "mindspore", "canonical")


def _ms_official_checkpoint(params: dict) -> Checkpoint:
    """A checkpoint of the authors' MindSpore code: its names kept, training state dropped and listed."""
    state, dropped = {}, []
    for name, value in params.items():
        if is_ms_training_state(name) or not isinstance(value, np.ndarray):
            dropped.append(name)
        else:
            state[name] = value
    return Checkpoint(state, {"source_layout": "mindspore-official", "dropped_training_state": dropped},
                      "mindspore", "ms_official")


# ---- writing ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(dst, force: bool = False, parents: bool = True):
    """Yield a temporary path beside ``dst``; see :func:`dvt_core.fileio.atomic_write`.

    Without ``force`` an existing ``dst`` (a dangling symlink included) is refused, also when another
    writer creates it meanwhile; with it the file is replaced keeping its mode.
    """
    with fileio.atomic_write(dst, force=force, parents=parents) as tmp:
        yield tmp


def write_checkpoint(path, state: dict[str, np.ndarray], meta: Optional[dict] = None, fmt: Optional[str] = None,
                     force: bool = False, parents: bool = False) -> Path:
    """Write canonical ``state`` and ``meta`` atomically. ``fmt`` defaults from the file suffix;
    a suffix that names another format than ``fmt`` is refused (a file must say what it holds). A missing
    folder is refused unless ``parents`` (nothing is created silently)."""
    path = Path(path)
    named = suffix_format(path)
    fmt = fmt or format_for_suffix(path)
    if named is not None and named != {"mindspore-official": "mindspore"}.get(fmt, fmt):
        raise CheckpointError(f"{path}: the suffix says {named} but the format written would be {fmt}; "
                              f"name the file for its format ({suggest_suffix(fmt)})")
    meta = _plain(meta or {})
    writer = {"safetensors": _write_safetensors, "torch": _write_torch, "mindspore": _write_mindspore,
              "mindspore-official": _write_mindspore_official}.get(fmt)
    if writer is None:
        raise CheckpointError(f"cannot write format {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}")
    fileio.check_writable(path, force=force, parents=parents)
    state = {k: np.require(v, requirements="C") for k, v in state.items()}  # keeps 0-d tensors 0-d
    with atomic_path(path, force=force, parents=parents) as tmp:
        writer(tmp, state, meta)
    return path


def suffix_format(path) -> Optional[str]:
    """The format a file name announces, or None for a neutral name (``.bin``, no suffix)."""
    name = str(path).lower()
    for suffix, fmt in SUFFIX_FORMATS:
        if name.endswith(suffix):
            return fmt
    return None


def suggest_suffix(fmt: str) -> str:
    return {"safetensors": ".safetensors", "mindspore": ".ckpt", "mindspore-official": ".ckpt",
            "torch": ".pth"}.get(fmt, "")


def format_for_suffix(path) -> str:
    fmt = suffix_format(path)
    if fmt is None and str(path).lower().endswith(".bin"):
        fmt = "torch"
    if fmt is None:
        raise CheckpointError(f"cannot tell the format of {path} from its suffix; use .safetensors, .pth or .ckpt "
                              "(or name the format)")
    return fmt


def _write_failed(tmp: Path, exc: BaseException):
    from dvt_core.errors import OutputError

    first = _ANSI.sub("", str(exc)).strip().splitlines()[0] if str(exc).strip() else "write failed"
    return OutputError(f"cannot write {tmp.name.split(fileio.TEMP_MARK)[0].lstrip('.')}: the write failed "
                       f"(disk full or file size limit?): {first[:160]}")


def _write_safetensors(tmp: Path, state, meta) -> None:
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    try:
        save_file(state, str(tmp), metadata={"dvt": json.dumps(meta)})
    except SafetensorError as exc:  # its I/O errors (disk full) arrive as this
        raise _write_failed(tmp, exc) from None


def _write_torch(tmp: Path, state, meta) -> None:
    try:
        _framework_files("torch", tmp, "writing").write_file(tmp, state, {META_ENTRY: json.dumps(meta)})
    except RuntimeError as exc:  # torch's zip writer reports a failed write (disk full, size limit) this way
        raise _write_failed(tmp, exc) from None


def _write_mindspore(tmp: Path, state, meta) -> None:
    names = {k: canonical_to_mindspore(k) for k in state}
    seen, clash = set(), set()
    for n in list(names.values()) + [MINDSPORE_META_KEY]:
        (clash if n in seen else seen).add(n)
    if clash:
        raise CheckpointError(f"cannot write a MindSpore checkpoint: the names {sorted(clash)} collide once "
                              "renamed for MindSpore")
    ckpt_format.write_ckpt(tmp, {names[k]: v for k, v in state.items()}, {MINDSPORE_META_KEY: json.dumps(meta)})


def _write_mindspore_official(tmp: Path, state, meta) -> None:
    """The authors' MindSpore layout: their names and order, nothing else (no metadata entry)."""
    try:
        params = canonical_to_ms_official(state)
    except ValueError as exc:
        raise CheckpointError(f"cannot write the authors' MindSpore layout: {exc}") from None
    ckpt_format.write_ckpt(tmp, params, {})


# ---- checking tensors against a spec, before any model is built ------------------------------------

FLOAT64_TOLERANCE = 1e-6  # relative change a float64 -> float32 cast may make and still count as lossless


def check_values(state: dict, source: str, allow_lossy: bool = False) -> tuple[dict, list[str]]:
    """``(float32 state, notes)``: NaN / inf refused naming the tensor; lossy casts (int or bool to
    float, float64 beyond :data:`FLOAT64_TOLERANCE`) refused unless ``allow_lossy``; every cast made
    is listed in ``notes`` (one line each) and emitted as a :class:`CheckpointWarning`."""
    out, casts, lossy = {}, [], []
    for k, v in state.items():
        source_dtype = getattr(v, "source_dtype", None)
        a = np.asarray(v)
        kind = a.dtype.kind
        if isinstance(v, WidenedArray):
            if not np.all(np.isfinite(a)):
                raise CheckpointError(f"{source}: tensor {k!r} holds NaN or infinite values")
            casts.append(f"{k}: {source_dtype} -> float32")
            out[k] = a
        elif kind == "f" and a.dtype != np.float32:
            if not np.all(np.isfinite(a)):
                raise CheckpointError(f"{source}: tensor {k!r} holds NaN or infinite values")
            with np.errstate(over="ignore", invalid="ignore"):  # an out-of-range value is reported as lossy below
                f = a.astype(np.float32)
            if a.dtype.itemsize > 4:
                err = np.abs(f.astype(a.dtype) - a)
                scale = np.maximum(np.abs(a), np.finfo(np.float32).tiny)
                if not np.all(np.isfinite(f)) or (a.size and float(np.max(err / scale)) > FLOAT64_TOLERANCE):
                    lossy.append(f"{k} ({a.dtype})")
            casts.append(f"{k}: {a.dtype} -> float32")
            out[k] = f
        elif kind == "f":
            if not np.all(np.isfinite(a)):
                raise CheckpointError(f"{source}: tensor {k!r} holds NaN or infinite values")
            out[k] = a
        elif kind in "biu":
            lossy.append(f"{k} ({a.dtype})")
            casts.append(f"{k}: {a.dtype} -> float32")
            out[k] = a.astype(np.float32)
        else:
            raise CheckpointError(f"{source}: tensor {k!r} has dtype {a.dtype}, not a number")
    if lossy and not allow_lossy:
        shown = ", ".join(lossy[:5]) + (f" (+{len(lossy) - 5} more)" if len(lossy) > 5 else "")
        raise CheckpointError(f"{source}: casting to float32 would change {shown}; "
                              "refused (allow_lossy=True / --allow-lossy-cast to accept)")
    notes = [f"{source}: cast {c}" for c in casts]
    if casts:
        shown = ", ".join(casts[:3]) + (f" (+{len(casts) - 3} more)" if len(casts) > 3 else "")
        warnings.warn(f"{source}: {len(casts)} tensor(s) cast on load: {shown}", CheckpointWarning, stacklevel=2)
    return out, notes


def checked_state(ckpt: Checkpoint, spec, source: Optional[str] = None, allow_lossy: bool = False) -> dict:
    """``ckpt``'s canonical state checked against ``spec`` (shapes first, then values), as float32."""
    source = source or str(ckpt.path)
    state = ckpt.canonical_state(spec.num_exits, spec.in_chans)
    check_spec_state(spec, state, source)  # names and shapes from the spec: nothing allocated yet
    state, notes = check_values(state, source, allow_lossy=allow_lossy)
    if notes:
        ckpt.meta["load_casts"] = notes  # kept as model.checkpoint_meta: the casts made are listed, not hidden
    return state
