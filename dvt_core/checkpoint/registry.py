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


@lru_cache(maxsize=4)
def _registry(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"weights registry not found at {p} (set {WEIGHTS_ENV} to the folder holding it)")
    return yaml.safe_load(p.read_text()) or {}


def registry() -> dict:
    return _registry(str(weights_dir() / "registry.yaml"))


def shipped_models() -> list[str]:
    return sorted((registry().get("shipped") or {}).keys())


def sha256(path) -> str:
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


def official_release() -> list[dict]:
    """The authors' released checkpoints this project imports (file name, architecture, notes)."""
    return list(registry().get("official") or [])
