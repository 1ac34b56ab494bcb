"""Reading and writing checkpoints in every format DVT meets, recognised from the content.

Formats:
* ``official``    the authors' release ``*.pth.tar``: a torch pickle with ``model_state_dict`` and
                  the metadata ``flops``, ``anytime_classification``, ``dynamic_threshold``,
                  ``budgeted_batch_classification``;
* ``torch``       a torch file holding a state dict, or ``{"state_dict": ..., "dvt_meta": ...}``;
* ``safetensors`` the neutral format: canonical names, metadata as JSON under ``dvt``;
* ``mindspore``   a MindSpore ``.ckpt`` (MindSpore parameter names, metadata as JSON under ``dvt_meta``).

Torch files are read with ``torch.load(..., weights_only=True)``: a pickle that would run code is
refused, never executed. Every writer goes through a temporary file renamed into place, so a failure
leaves no half-written file. Tensors travel as numpy arrays; frameworks are imported only when a file
of theirs appears.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import CheckpointError, UnsafeCheckpointError
from .naming import canonical_to_mindspore, is_official_layout, mindspore_to_canonical, rename_official

OFFICIAL_META_KEYS = ("flops", "anytime_classification", "dynamic_threshold", "budgeted_batch_classification")
FORMATS = ("official", "torch", "safetensors", "mindspore")
META_ENTRY = "dvt_meta"  # the entry of a torch or MindSpore file that holds the metadata as JSON


@dataclass
class Checkpoint:
    """Tensors as numpy arrays plus metadata. ``layout`` says how the names are spelled."""

    state: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = "torch"
    layout: str = "canonical"  # "canonical" or "official"
    path: Optional[str] = None

    def canonical_state(self, num_exits: int) -> dict[str, np.ndarray]:
        """The tensors under canonical names (official keys renamed for a ``num_exits`` cascade)."""
        if self.layout == "official":
            return rename_official(self.state, num_exits)
        return dict(self.state)

    @property
    def arch(self) -> Optional[str]:
        return self.meta.get("arch")


def _framework_files(name: str, path, action: str = "reading"):
    """The backend ``dvt_backends.<name>``, whose ``read_file`` / ``write_file`` handle the framework's own
    files; imported only now."""
    import importlib

    try:
        return importlib.import_module(f"dvt_backends.{name}")
    except ImportError:
        raise CheckpointError(f"{path} is a {name} checkpoint; {action} it needs {name} "
                              f"(pip install 'dvt[{name}]')") from None


# ---- format detection -----------------------------------------------------------------------------

def sniff_format(path) -> str:
    """'torch', 'safetensors' or 'mindspore' from the first bytes; CheckpointError for anything else."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory, not a checkpoint file")
    with open(p, "rb") as fh:
        head = fh.read(16)
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
    if head[:1] == b"\x0a":  # protobuf field 1 (MindSpore's Checkpoint.value), length-delimited
        return "mindspore"
    raise CheckpointError(f"{p} is not a checkpoint this project reads (torch .pth/.pth.tar, .safetensors, "
                          f"MindSpore .ckpt); its first bytes are {head[:8]!r}")


def read_checkpoint(path) -> Checkpoint:
    """Read any supported checkpoint file into a :class:`Checkpoint`."""
    fmt = sniff_format(path)
    reader = {"torch": _read_torch, "safetensors": _read_safetensors, "mindspore": _read_mindspore}[fmt]
    ckpt = reader(Path(path))
    ckpt.path = str(path)
    return ckpt


# ---- torch -----------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _pickle_payloads(path: Path) -> list[bytes]:
    """The pickle bytes of a torch file: ``data.pkl`` inside the zip, or the raw file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return [zf.read(n) for n in zf.namelist() if n.endswith(".pkl")]
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
    except Exception:  # truncated or not a pickle: the caller reports corruption
        return None
    return found


def _torch_load(path: Path):
    import pickle

    files = _framework_files("torch", path)
    try:
        return files.read_file(path)  # torch.load(..., weights_only=True), tensors as numpy
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


def _to_numpy_state(d: dict, path: Path) -> dict[str, np.ndarray]:
    out = {}
    for k, v in d.items():
        if not isinstance(k, str) or not isinstance(v, np.ndarray):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; "
                                  "this does not look like a state dict")
        out[k] = v
    return out


def _plain(obj):
    """Metadata as JSON-friendly Python values (numpy arrays become lists)."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _read_torch(path: Path) -> Checkpoint:
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a DVT checkpoint")
    if "model_state_dict" in obj:  # the official release
        state = _to_numpy_state(obj["model_state_dict"], path)
        meta = {k: _plain(obj[k]) for k in OFFICIAL_META_KEYS if k in obj}
        layout = "official" if is_official_layout(state) else "canonical"
        return Checkpoint(state, meta, "official", layout)
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state = _to_numpy_state(obj["state_dict"], path)
        meta = _plain(obj.get(META_ENTRY, {}))
        if isinstance(meta, str):
            meta = json.loads(meta)
    else:
        state = _to_numpy_state(obj, path)
        meta = {}
    layout = "official" if is_official_layout(state) else "canonical"
    return Checkpoint(state, meta, "torch", layout)


# ---- safetensors -------------------------------------------------------------------------------------

def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        state = {}
        with safe_open(str(path), framework="numpy") as f:
            meta_raw = (f.metadata() or {}).get("dvt", "{}")
            for k in f.keys():
                state[k] = f.get_tensor(k)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its 'dvt' metadata is not valid JSON") from None
    layout = "official" if is_official_layout(state) else "canonical"
    return Checkpoint(state, meta, "safetensors", layout)


# ---- MindSpore -------------------------------------------------------------------------------------

def _read_mindspore(path: Path) -> Checkpoint:
    meta_key = META_ENTRY
    files = _framework_files("mindspore", path)
    try:
        params = files.read_file(path)
    except Exception as exc:  # MindSpore raises ValueError/RuntimeError with long messages
        raise CheckpointError(f"{path} is not a readable MindSpore checkpoint "
                              f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
                              ) from None
    meta, state = {}, {}
    for name, value in params.items():
        if name == meta_key:
            try:
                meta = json.loads(value if isinstance(value, str) else str(value))
            except json.JSONDecodeError:
                raise CheckpointError(f"{path}: its {meta_key!r} metadata is not valid JSON") from None
            continue
        if isinstance(value, (str, int, float, bool)):
            continue  # other append_dict entries (epoch_num, step_num, ...)
        state[mindspore_to_canonical(name)] = value
    return Checkpoint(state, meta, "mindspore", "canonical")


# ---- writing ---------------------------------------------------------------------------------------

def check_writable(dst, force: bool = False) -> Path:
    """Refuse, naming ``dst``, an output that could not be written: a folder, a file that exists
    (unless ``force``), a parent folder that is missing (never created silently), not a folder, or not
    writable. Call it before the work whose result goes there."""
    from .errors import InputError

    dst = Path(dst)
    if dst.is_dir():
        raise InputError(f"cannot write {dst}: it is a folder; name a file")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass force=True (--force) to overwrite it")
    parent = dst.parent
    if not parent.exists():
        raise InputError(f"cannot write {dst}: the folder {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise InputError(f"cannot write {dst}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {dst}: the folder {parent} is not writable")
    return dst


@contextlib.contextmanager
def atomic_path(dst, force: bool = False):
    """Yield a temporary path beside ``dst``; on success rename it onto ``dst``, on failure remove it.
    ``dst`` must be writable (:func:`check_writable`); a missing parent folder is not created."""
    dst = check_writable(dst, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=str(dst.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp and some writers make 0600/0400; a checkpoint is an ordinary file
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_checkpoint(path, state: dict[str, np.ndarray], meta: Optional[dict] = None, fmt: Optional[str] = None,
                     force: bool = False) -> Path:
    """Write canonical ``state`` and ``meta`` atomically. ``fmt`` defaults from the file suffix."""
    path = Path(path)
    fmt = fmt or format_for_suffix(path)
    meta = _plain(meta or {})
    state = {k: np.require(v, requirements="C") for k, v in state.items()}  # keeps 0-d tensors 0-d
    writer = {"safetensors": _write_safetensors, "torch": _write_torch, "mindspore": _write_mindspore}.get(fmt)
    if writer is None:
        raise CheckpointError(f"cannot write format {fmt!r}; choose one of torch, safetensors, mindspore")
    with atomic_path(path, force=force) as tmp:
        writer(tmp, state, meta)
    return path


def format_for_suffix(path) -> str:
    name = str(path).lower()
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(".ckpt"):
        return "mindspore"
    if name.endswith((".pth", ".pt", ".pth.tar", ".bin")):
        return "torch"
    raise CheckpointError(f"cannot tell the format of {path} from its suffix; use .safetensors, .pth or .ckpt "
                          "(or name the format)")


def _write_safetensors(tmp: Path, state, meta) -> None:
    from safetensors.numpy import save_file

    save_file(state, str(tmp), metadata={"dvt": json.dumps(meta)})


def _write_torch(tmp: Path, state, meta) -> None:
    _framework_files("torch", tmp, "writing").write_file(tmp, state, {META_ENTRY: json.dumps(meta)})


def _write_mindspore(tmp: Path, state, meta) -> None:
    meta_key = META_ENTRY
    files = _framework_files("mindspore", tmp, "writing")
    names = {k: canonical_to_mindspore(k) for k in state}
    seen, clash = set(), set()
    for n in list(names.values()) + [meta_key]:
        (clash if n in seen else seen).add(n)
    if clash:
        raise CheckpointError(f"cannot write a MindSpore checkpoint: the names {sorted(clash)} collide once "
                              "renamed for MindSpore")
    files.write_file(tmp, {names[k]: v for k, v in state.items()}, {meta_key: json.dumps(meta)})
