"""The weights this project ships, and the registry of known checkpoints (``weights/registry.yaml``).

``build(name, weights="default")`` resolves here: the file is looked up in the registry, its SHA-256
checked (a corrupted or truncated download fails loudly), and the path returned.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from .errors import CheckpointError

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


def default_weights_path(name, verify: bool = True) -> Path:
    """Path of the shipped weights of model ``name``; CheckpointError when none ship."""
    shipped = registry().get("shipped") or {}
    if name not in shipped:
        have = ", ".join(sorted(shipped)) or "none"
        raise CheckpointError(f"no default weights ship for {name!r}; models with default weights: {have}")
    entry = shipped[name]
    path = weights_dir() / entry["file"]
    if not path.exists():
        raise CheckpointError(f"default weights of {name} are missing: {path}")
    if verify and entry.get("sha256") and sha256(path) != entry["sha256"]:
        raise CheckpointError(f"{path} does not match its registered SHA-256 (corrupted or replaced)")
    return path


def official_release() -> list[dict]:
    """The authors' released checkpoints this project imports (file name, architecture, notes)."""
    return list(registry().get("official") or [])
