"""Helpers several test modules share (a test module never imports another)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# a tiny Fashion-MNIST-shaped DVT: one block per stage, width 16 (training runs take seconds)
TINY = dict(depth=1, embed_dim=16, num_heads=2, feature_reuse_dim=4, feature_reuse_hidden=8)


def synthetic(n: int = 300, seed: int = 0):
    """uint8 (n, 28, 28) noise with a bright 10x3 square whose position (2 rows x 5 columns, mirrored
    left-right) is the class; int64 labels, 10 classes in equal numbers."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for img, c in zip(images, labels):
        r, col = 2 + 13 * (c // 5), 1 + 3 * (c % 5)
        img[r:r + 10, col:col + 3] = 255
        img[r:r + 10, 27 - col - 2:27 - col + 1] = 255
    return images, labels.astype(np.int64)


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """PNG files ``root/class<c>/<i>.png`` (grey or RGB, as ``images`` are)."""
    from PIL import Image

    for i, (img, c) in enumerate(zip(images, labels)):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L" if img.ndim == 2 else "RGB").save(folder / f"{i:03d}.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dvt(*args, cwd=None, timeout: int = 300, env=None) -> subprocess.CompletedProcess:
    """``python -m dvt_core ARGS`` in a fresh process (one thread, the checkout importable)."""
    full = dict(os.environ if env is None else env, PYTHONPATH=str(REPO))
    full.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "dvt_core", *map(str, args)], cwd=cwd or os.getcwd(), env=full,
                          capture_output=True, text=True, timeout=timeout)
