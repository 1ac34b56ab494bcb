"""The weights this project ships, and the registry of known checkpoints (``weights/registry.yaml``).

``build(name, weights="default")`` resolves here: the file is looked up in the registry, its SHA-256
checked (a corrupted or truncated download fails loudly), and the path returned.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from dvt_core.errors import CheckpointError

WEIGHTS_ENV = "DVT_WEIGHTS_DIR"


def weights_dir() -> Path:
    """``$DVT_WEIGHTS_DIR``, else ``weights/`` beside ``dvt_core`` (a checkout), else the installed ``dvt_weights``."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent / "weights"
    if (checkout / "registry.yaml").exists():
        return checkout
    import importlib.util

    installed = importlib.util.find_spec("dvt_weights")  # locates the package without importing anything
    if installed is not None and installed.submodule_search_locations:
        return Path(list(installed.submodule_search_locations)[0])
    return checkout


REGISTRY_MAX_BYTES = 1 << 20


@lru_cache(maxsize=4)
def _registry(path: str) -> dict:
    """The registry, read as untrusted input: at most :data:`REGISTRY_MAX_BYTES`, a mapping whose
    ``shipped`` entries each name a ``file`` and a ``sha256`` (checked when used)."""
    import yaml

    from dvt_core import schema

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"weights registry not found at {p} (set {WEIGHTS_ENV} to the folder holding it)")
    raw = schema.read_bytes(p, "weights registry", CheckpointError, REGISTRY_MAX_BYTES)
    try:
        data = yaml.safe_load(raw.decode("utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"weights registry {p} is not readable YAML ({first[:120]})") from None
    schema.want_dict(data, f"weights registry {p}", CheckpointError)
    shipped = data.get("shipped") or {}
    schema.want_dict(shipped, f"weights registry {p}: shipped", CheckpointError)
    for name, entry in shipped.items():
        schema.want_dict(entry, f"weights registry {p}: shipped.{name}", CheckpointError)
    schema.want_list(data.get("official") or [], f"weights registry {p}: official", error=CheckpointError)
    return data


def registry() -> dict:
    return _registry(str(weights_dir() / "registry.yaml"))


def shipped_models() -> list[str]:
    return sorted((registry().get("shipped") or {}).keys())


def sha256(path) -> str:
    """SHA-256 of a regular file (a FIFO or device is refused, never opened)."""
    from dvt_core import schema

    schema.check_regular_file(path, "file", CheckpointError)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _entry_path(name: str, entry) -> Path:
    """The file of a registry entry, which must lie inside the weights folder."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not entry["file"]:
        raise CheckpointError(f"weights registry: the entry of {name!r} names no file")
    root = weights_dir().resolve()
    rel = Path(entry["file"])
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"weights registry: the file of {name!r} ({entry['file']}) must be a name inside "
                              f"{root}, not a path leading out of it")
    path = (root / rel).resolve()
    if root != path and root not in path.parents:
        raise CheckpointError(f"weights registry: the file of {name!r} resolves to {path}, outside {root}")
    return path


def _check_hex(value, what: str) -> str:
    text = str(value or "").strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise CheckpointError(f"{what} is not a SHA-256 (64 hex digits): {str(value)[:80]!r}")
    return text


def verify_sha256(path, expected: str) -> Path:
    """Check that the file at ``path`` has the SHA-256 ``expected`` (``--sha256``); CheckpointError if not."""
    want = _check_hex(expected, "--sha256")
    got = sha256(path)
    if got != want:
        raise CheckpointError(f"{path} has SHA-256 {got}, not the expected {want}")
    return Path(path)


def default_weights_path(name, verify: bool = True) -> Path:
    """Path of the shipped weights of model ``name``; CheckpointError when none ship.

    Every registry entry must carry a ``sha256`` (a missing one is an error, never a skipped check)
    and name a file inside the weights folder.
    """
    shipped = registry().get("shipped") or {}
    if name not in shipped:
        have = ", ".join(sorted(shipped)) or "none"
        raise CheckpointError(f"no default weights ship for {name!r}; models with default weights: {have}")
    entry = shipped[name]
    path = _entry_path(name, entry)
    want = _check_hex(entry.get("sha256"), f"weights registry: the sha256 of {name!r}")
    if not path.is_file():
        raise CheckpointError(f"default weights of {name} are missing: {path}")
    if verify and sha256(path) != want:
        raise CheckpointError(f"{path} does not match its registered SHA-256 (corrupted or replaced)")
    return path


def has_shipped_weights(name) -> bool:
    """True when the project ships weights for model ``name`` (False when the registry is unreadable)."""
    from dvt_core.errors import DVTError

    try:
        return name in shipped_models()
    except DVTError:
        return False


def is_shipped_file(path) -> bool:
    """True when ``path`` is one of the weight files this project ships (their SHA-256 is registered)."""
    from dvt_core.errors import DVTError

    try:
        entries = (registry().get("shipped") or {}).items()
        target = Path(path).resolve()
        return any(_entry_path(name, e) == target for name, e in entries)
    except (DVTError, OSError):
        return False


def check_weights(model, weights, expected_sha256=None) -> None:
    """Before any framework is imported: the checks ``build`` would make late, made early and named.

    ``weights`` is a file (it must exist and be a regular file; ``expected_sha256`` checks it) or
    ``"default"`` (weights must ship for ``model``; their registered SHA-256 is checked when read).
    """
    from dvt_core import schema
    from dvt_core.errors import InputError

    if weights is None or str(weights) == "default":
        if expected_sha256:
            raise InputError("--sha256 checks an explicit --weights FILE (shipped weights are always checked)")
        if weights is not None:
            default_weights_path(model, verify=False)  # no weights ship for this model: say so now
        return
    if not os.path.lexists(weights):
        raise InputError(f"weights file not found: {weights}")
    if not os.path.isdir(weights):  # an export folder is checked by its runtime
        schema.check_regular_file(weights, "weights file", CheckpointError)
    if expected_sha256:
        verify_sha256(weights, expected_sha256)
