"""MindSpore checkpoint files (``.ckpt``) for dvt_core.checkpoints: numpy in, numpy out.

Names are MindSpore's (dvt_core.naming maps them); string entries are MindSpore's ``append_dict``.
"""
from __future__ import annotations

import contextlib
import os

import mindspore as ms


def load(path) -> dict:
    """Name -> numpy array for tensors, or the plain value of an appended entry. Raises what MindSpore raises."""
    out = {}
    for name, value in ms.load_checkpoint(str(path)).items():
        out[name] = value if isinstance(value, (str, int, float, bool)) else value.asnumpy()
    return out


def save(path, state: dict, entries: dict) -> None:
    """Write ``state`` (MindSpore names -> numpy arrays) and the string ``entries`` (``append_dict``) to ``path``."""
    items = [{"name": name, "data": ms.Tensor(v)} for name, v in state.items()]
    # MindSpore appends ".ckpt" to names without it; write beside the requested name and move it there,
    # never leaving that file behind.
    target = str(path) + ".ckpt"
    try:
        ms.save_checkpoint(items, target, append_dict=dict(entries))
        os.replace(target, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
