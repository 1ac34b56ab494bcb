"""MindSpore checkpoint files (``.ckpt``) for dvt_core.checkpoint.files: numpy in, numpy out.

Names are MindSpore's (dvt_core.checkpoint.naming maps them); string entries are MindSpore's ``append_dict``.
The bytes are decoded and written by dvt_core.checkpoint.ms_ckpt, which checks every tensor's length against
its dims and dtype: a crafted file never reaches ``mindspore.load_checkpoint`` (whose parser trusts
them). The files written are the ones ``mindspore.save_checkpoint`` writes, and it reads them back.
"""
from __future__ import annotations

from dvt_core.checkpoint import ms_ckpt as ckpt_format


def load(path) -> dict:
    """Name -> numpy array for tensors, or the string of an appended entry. Raises CheckpointError."""
    tensors, strings = ckpt_format.read_ckpt(path)
    return {**tensors, **strings}


def save(path, state: dict, entries: dict) -> None:
    """Write ``state`` (MindSpore names -> numpy arrays) and the string ``entries`` (``append_dict``) to ``path``."""
    ckpt_format.write_ckpt(path, state, {k: str(v) for k, v in entries.items()})
