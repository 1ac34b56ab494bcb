"""Helpers that rebuild the official release from ../shared/conformance (never copied into the repo)."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFORMANCE = SHARED / "conformance"


def conformance_dir() -> Path:
    if not CONFORMANCE.is_dir():
        pytest.skip(f"conformance data not found at {CONFORMANCE} (it lives in ../shared beside the repo)")
    return CONFORMANCE


def official_weight(key: str, shape) -> np.ndarray:
    """The conformance README's deterministic weight for one official key."""
    shape = tuple(shape)
    rng = np.random.default_rng(zlib.crc32(key.encode("utf-8")))
    z = rng.standard_normal(shape)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) >= 2:
        z = z / np.sqrt(np.prod(shape[1:]))
    elif leaf == "weight":
        z = 1 + 0.1 * z
    elif leaf == "bias":
        z = 0.1 * z
    elif leaf == "w":
        pass
    else:
        z = 0.02 * z
    return z.astype(np.float32)


def official_keys(name: str) -> list[tuple[str, list[int]]]:
    d = json.loads((conformance_dir() / f"official_{name}.keys.json").read_text())
    s = d["state_dict_shapes"]
    return list(s.items()) if isinstance(s, dict) else [tuple(x) for x in s]


def official_state_from_shapes(shapes) -> dict:
    return {k: official_weight(k, shp) for k, shp in shapes}


def write_official_release(path: Path, state: dict, meta: dict | None = None) -> Path:
    """A ``*.pth.tar`` in the official layout: ``model_state_dict`` plus the release's metadata."""
    import torch

    obj = {"model_state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}}
    obj.update(meta or {
        "flops": [0.5, 1.4, 3.4],
        "anytime_classification": [70.0, 76.0, 79.0],
        "dynamic_threshold": torch.zeros(59, 3),
        "budgeted_batch_classification": [[1.0, 2.0], [75.0, 77.0]],
    })
    torch.save(obj, path)
    return path


def exit_differences(ours, reference) -> list[float]:
    """max |difference| of each exit's logits (tensors or arrays, matching shapes required)."""
    assert len(ours) == len(reference), f"{len(ours)} exits vs {len(reference)} in the reference"
    out = []
    for i, (a, b) in enumerate(zip(ours, reference)):
        a = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
        b = b.detach().cpu().numpy() if hasattr(b, "detach") else np.asarray(b)
        assert a.shape == b.shape, f"exit {i + 1}: shape {a.shape} vs {b.shape} in the reference"
        out.append(float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()))
    return out


def assert_exits_close(ours, reference, atol: float = 1e-4, what: str = "") -> None:
    """Every exit within ``atol`` of the reference; the message names the worst exit and difference."""
    diffs = exit_differences(ours, reference)
    worst = int(np.argmax(diffs))
    per_exit = ", ".join(f"{d:.2e}" for d in diffs)
    assert diffs[worst] <= atol, (f"{what}: worst max|difference| {diffs[worst]:.3e} at exit {worst + 1} "
                                  f"exceeds {atol:g} (per exit: {per_exit})")
