"""Per-stage ONNX export of a torch DVT (see dvt_core.export.writer for the graphs' inputs and outputs).

Each stage is traced on its own, wrapped so that it takes ``images`` and the previous stage's carry and
returns its logits and the carry the next stage reads, with a dynamic batch axis.
"""
from __future__ import annotations

import contextlib
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dvt_core.export.manifest import FEATURES, PREV, RELATIONS, carry_names, stage_entry

from .cascade import DVT, Reuse
from .layers import TokenResize
from .tokenizers import T2TModule

BATCH_AXES = {FEATURES: 0, RELATIONS: 0}


class StageGraph(nn.Module):
    """Stage ``index`` as a graph: (images, *carry in) -> (logits, *carry out)."""

    def __init__(self, model: DVT, index: int):
        super().__init__()
        self.model = model
        self.index = index
        spec = model.spec
        self.inputs = carry_names(spec, index - 1) if index > 0 else []
        self.outputs = carry_names(spec, index)
        self.prev_heads = spec.stages[index - 1].num_heads if index > 0 else 0

    def forward(self, images: torch.Tensor, *carry: torch.Tensor):
        got = dict(zip(self.inputs, carry))
        reuse = None
        if self.index > 0:
            rel = got.get(RELATIONS)
            reuse = Reuse(got.get(FEATURES), None if rel is None else tuple(rel.split(self.prev_heads, dim=1)))
        logits, out = self.model.run_stage(self.index, images, reuse)
        extra = []
        for name in self.outputs:
            extra.append(out.features if name == FEATURES else torch.cat(out.relations, dim=1))
        return (logits, *extra) if extra else logits


def _split_by_gather(self: T2TModule, x: torch.Tensor, i: int) -> torch.Tensor:
    """T2TModule's soft split as a fixed gather: same values, traceable with a dynamic batch axis.

    (Tensor.unfold does not export with a symbolic batch size.) Features in F.unfold's order.
    """
    t = self.t2t
    k, s, p = t.kernels[i], t.strides[i], t.paddings[i]
    h, w, c = (int(v) for v in x.shape[1:])
    hp, wp = h + 2 * p, w + 2 * p
    oh, ow = (hp - k) // s + 1, (wp - k) // s + 1
    rows = np.arange(oh)[:, None, None, None] * s + np.arange(k)[None, None, :, None]
    cols = np.arange(ow)[None, :, None, None] * s + np.arange(k)[None, None, None, :]
    idx = torch.from_numpy((rows * wp + cols).reshape(-1)).to(x.device)
    x = F.pad(x, (0, 0, p, p, p, p)).reshape(-1, hp * wp, c)
    g = x.index_select(1, idx).reshape(-1, oh * ow, k * k, c)
    return g.transpose(2, 3).reshape(-1, oh * ow, c * k * k)


def _padded_taps(resize: TokenResize) -> tuple[torch.Tensor, torch.Tensor]:
    """The resize's taps as (n_new, K) source indices and weights, short rows padded with weight 0."""
    starts = resize.offsets.tolist() + [resize.nnz]
    counts = [b - a for a, b in zip(starts[:-1], starts[1:])]
    width = max(counts)
    index = torch.zeros(resize.n_new, width, dtype=torch.int64)
    weight = torch.zeros(resize.n_new, width, dtype=resize.weights.dtype)
    for row, (a, n) in enumerate(zip(starts[:-1], counts)):
        index[row, :n] = resize.indices[a:a + n]
        weight[row, :n] = resize.weights[a:a + n]
    return index.to(resize.indices.device), weight.to(resize.weights.device)


def _resize_by_gather(self: TokenResize, x: torch.Tensor) -> torch.Tensor:
    """TokenResize as Gather, Mul and ReduceSum: the same weighted sums, exported without the Loop nodes
    that ``embedding_bag`` becomes in ONNX (ONNX Runtime runs those far slower)."""
    index, weight = self._export_taps
    picked = x.index_select(-2, index.reshape(-1))  # (..., n_new * K, C)
    picked = picked.reshape(x.shape[:-2] + (self.n_new, index.shape[1], x.shape[-1]))
    return (picked * weight.to(x.dtype)[..., None]).sum(dim=-2)


@contextlib.contextmanager
def exportable(model: DVT):
    """Swap in traceable, Loop-free forms of the soft split and the reuse resize for an export."""
    splits = [m for m in model.modules() if isinstance(m, T2TModule)]
    resizes = [m for m in model.modules() if isinstance(m, TokenResize)]
    for m in splits:
        m._split = types.MethodType(_split_by_gather, m)
    for m in resizes:
        m._export_taps = _padded_taps(m)
        m.forward = types.MethodType(_resize_by_gather, m)
    try:
        yield model
    finally:
        for m in splits:
            del m._split
        for m in resizes:
            del m.forward, m._export_taps


def export_stages(model: DVT, out_dir: Path, opset: int = 17, batch: int = 2):
    """Write ``stage{i}.onnx`` for every stage into ``out_dir``: (stage entries, versions, batch axes)."""
    import onnx

    spec = model.spec
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    images = torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size, device=dev)
    entries, carry = [], ()
    try:
        with exportable(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(spec.num_exits):
                g = StageGraph(model, i)
                names_in = ["images", *(PREV + n for n in g.inputs)]
                names_out = ["logits", *g.outputs]
                axes = {n: {0: "batch"} for n in names_in + names_out}
                file = f"stage{i + 1}.onnx"
                torch.onnx.export(g, (images, *carry), str(out_dir / file), input_names=names_in,
                                  output_names=names_out, dynamic_axes=axes, opset_version=opset, dynamo=False,
                                  do_constant_folding=True)
                out = g(images, *carry)
                carry = tuple(out[1:]) if isinstance(out, tuple) else ()
                entries.append(stage_entry(i, file, names_in, names_out))
    finally:
        model.train(was)
    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "opset": int(opset)}
    return entries, versions, dict(BATCH_AXES)
