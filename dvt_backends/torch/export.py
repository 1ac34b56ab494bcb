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

from .cascade import DVT, Reuse, Stage
from .layers import Attention, FactoredLogits, RelationReuse, TokenResize
from .tokenizers import PatchEmbed, T2TModule

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


def _resize_dense(self: TokenResize, x: torch.Tensor) -> torch.Tensor:
    """TokenResize as one MatMul by its constant matrix: more multiply-adds than the taps, but a product
    that runtimes run at full speed (and fuse with what is around it), where a gather runs as a copy loop."""
    return torch.matmul(self.matrix.to(x.dtype), x)


def _resize_by_gather(self: TokenResize, x: torch.Tensor) -> torch.Tensor:
    """TokenResize as Gather, Mul and ReduceSum: the same weighted sums, exported without the Loop nodes
    that ``embedding_bag`` becomes in ONNX (ONNX Runtime runs those far slower)."""
    index, weight = self._export_taps
    picked = x.index_select(-2, index.reshape(-1))  # (..., n_new * K, C)
    picked = picked.reshape(x.shape[:-2] + (self.n_new, index.shape[1], x.shape[-1]))
    return (picked * weight.to(x.dtype)[..., None]).sum(dim=-2)


def _relation_reuse_activation_left(self: RelationReuse, prev_logits) -> torch.Tensor:
    """RelationReuse with its resize written as two products activation x constant (queries, then keys, one
    transpose between them) instead of ``M @ x`` twice. Same values as the module's own forward. Why: OpenVINO's
    CPU plugin turns a MatMul whose second input is constant into a FullyConnected, which its bf16 hint runs in
    bf16, while a MatMul with a constant first input stays f32 with reorders around it (DeiT-S stage 3 under the
    bf16 hint: 0.95 of the time; fp32 and ONNX Runtime unchanged; docs/deploy.md). The 1x1 mixing before it is
    activation x constant too (:func:`_relations_mixed_export`)."""
    r = self.mixed(prev_logits)  # (depth, B, heads, keys, queries), small grid
    m_t = self.resize.matrix.t().to(r.dtype)  # (n, N)
    r = torch.matmul(r, m_t)  # queries resized: (depth, B, heads, keys, N)
    return torch.matmul(r.transpose(-2, -1), m_t)  # keys resized: (depth, B, heads, N, N), queries first


def _relation_reuse_factored_export(self: RelationReuse, prev_logits) -> tuple:
    """RelationReuse.factored for an export with the dense resize: per block, the mixed logits resized along the
    queries (``R M``, one product activation x constant, as :func:`_relation_reuse_activation_left`) and the resize
    matrix, repeated per image and head, as the keys' extra columns (:class:`FactoredLogits`): the second resize
    and its (N x N) tensors are never written. The repeat is written as ``R + 0 x`` a slice of the activation, so
    that no node computes a shape from the batch size."""
    r = self.mixed(prev_logits)  # (depth, B, heads, keys, queries), small grid
    m_t = self.resize.matrix.t().to(r.dtype)  # (n, N)
    queries_resized = torch.matmul(r, m_t).transpose(-2, -1)  # (depth, B, heads, N queries, n keys): R M
    matrix = m_t.t() + queries_resized[0, :, :, :1, :1] * 0  # (B, heads, N keys, n)
    return tuple(FactoredLogits(left, matrix) for left in queries_resized)


# The export forms below write every reshape with the batch axis as -1 and the other sizes as numbers (only the
# batch axis is dynamic). The modules' own forms read the batch size from the tensor, which the trace records as
# a Shape -> Gather -> Unsqueeze -> Concat chain per reshape: about half of the 2x2 stage's nodes, and at batch 1
# each node costs the runtime a fixed time whatever its size. Same arithmetic, same values.


def _attention_export(self: Attention, x: torch.Tensor, reused_logits=None, need_logits: bool = True):
    """Attention as reshape, one Split into q, k, v (heads-major), products, softmax: reused + scale * q k^T,
    the module's order of operations, or with factored reused logits one product over the joined columns; the
    logits are returned when asked, as the module does."""
    n, c = int(x.shape[1]), int(x.shape[2])
    h = self.num_heads
    qkv = self.qkv(x).reshape(-1, n, 3 * h, c // h).transpose(1, 2)  # (B, 3 x heads, N, d): q, k, v heads
    q, k, v = qkv.split(h, dim=1)
    if isinstance(reused_logits, FactoredLogits):  # [scale q, left] @ [k, right]^T = scale q k^T + left right^T
        qa = torch.cat((q * self.scale, reused_logits.left.to(q.dtype)), dim=-1)
        logits = torch.matmul(qa, torch.cat((k, reused_logits.right.to(k.dtype)), dim=-1).transpose(-2, -1))
    else:
        logits = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        if reused_logits is not None:
            logits = reused_logits.to(logits.dtype) + logits
    y = torch.matmul(logits.softmax(dim=-1), v)  # (B, heads, N, d)
    return self.proj(y.transpose(1, 2).reshape(-1, n, c)), (logits if need_logits else None)


def _patches_export(self: PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    """PatchEmbed with its reshapes written for a dynamic batch axis only."""
    if not self.patches:
        y = self.proj(x)
        width, gh, gw = (int(v) for v in y.shape[1:])
        return y.reshape(-1, width, gh * gw).transpose(1, 2)
    c, h, w = (int(v) for v in x.shape[1:])
    k = self.proj.kernel_size[0]
    gh, gw = h // k, w // k
    if (gh * k, gw * k) != (h, w):
        x = x[:, :, :gh * k, :gw * k]
    x = x.reshape(-1, c, gh, k, gw, k).permute(0, 2, 4, 1, 3, 5).reshape(-1, gh * gw, c * k * k)
    return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)


def _relations_mixed_export(self: RelationReuse, prev_logits) -> torch.Tensor:
    """RelationReuse.mixed with the 1x1 convolutions as channels-last products of the positions (rows) by the
    (out, in) weight, each a 2-D Gemm with its bias, and the reshapes written for a dynamic batch axis only:
    (depth, B, heads, keys, queries), a view of the channels-last result. Why channels last: a product by a
    constant on the right (activation x weight) is what OpenVINO's CPU plugin turns into a FullyConnected, which
    its bf16 hint runs on the matrix units; the weight on the left (``W @ x``) stayed an f32 MatMul with reorders
    around it (DeiT-S under the bf16 hint, batch 8: stage 3 from 54 to 39 ms per image, docs/deploy.md)."""
    x = torch.cat(tuple(p.permute(0, 3, 2, 1) for p in prev_logits), dim=-1)  # (B, keys, queries, C)
    c, n = int(x.shape[-1]), int(x.shape[1])
    h = self.act(F.linear(x.reshape(-1, c), self.expand.weight.flatten(1), self.expand.bias))
    r = F.linear(h, self.reduce.weight.flatten(1), self.reduce.bias)  # (B x keys x queries, C)
    return r.reshape(-1, n, n, self.depth, self.reduce.out_channels // self.depth).permute(3, 0, 4, 1, 2)


@contextlib.contextmanager
def exportable(model: DVT, resize: str = "gather"):
    """Swap in traceable, Loop-free forms of the soft split and the reuse resize (``resize``: "gather",
    Gather + Mul + ReduceSum over the at most four taps; "dense", one MatMul) for an export."""
    splits = [m for m in model.modules() if isinstance(m, T2TModule)]
    resizes = [m for m in model.modules() if isinstance(m, TokenResize)]
    relations = [m for m in model.modules() if isinstance(m, RelationReuse)] if resize == "dense" else []
    for m in splits:
        m._split = types.MethodType(_split_by_gather, m)
    for m in resizes:
        if resize == "dense":
            m.forward = types.MethodType(_resize_dense, m)
        else:
            m._export_taps = _padded_taps(m)
            m.forward = types.MethodType(_resize_by_gather, m)
    for m in relations:
        m.forward = types.MethodType(_relation_reuse_activation_left, m)
    batch_only = {Attention: _attention_export, PatchEmbed: _patches_export}
    reshaped = [m for m in model.modules() if type(m) in batch_only]
    mixers = [m for m in model.modules() if isinstance(m, RelationReuse)]
    for m in reshaped:
        m.forward = types.MethodType(batch_only[type(m)], m)
    for m in mixers:
        m.mixed = types.MethodType(_relations_mixed_export, m)
    stages = [m for m in model.modules() if isinstance(m, Stage)]
    for m in stages:  # with the dense resize every stage takes its reused logits factored, the last one too
        m._factored_reuse = types.MethodType(lambda self, images, keep: resize == "dense", m)
    for m in relations:
        m.factored = types.MethodType(_relation_reuse_factored_export, m)
    try:
        yield model
    finally:
        for m in splits:
            del m._split
        for m in resizes + relations + reshaped:
            del m.forward
        for m in mixers:
            del m.mixed
        for m in stages:
            del m._factored_reuse
        for m in relations:
            del m.factored
        for m in resizes:
            m.__dict__.pop("_export_taps", None)


def export_stages(model: DVT, out_dir: Path, opset: int = 17, batch: int = 2, resize: str = "gather",
                  precision: str = "fp32"):
    """Write ``stage{i}.onnx`` for every stage into ``out_dir``: (stage entries, versions, batch axes).

    ``resize`` picks the form of the reuse resize (:func:`exportable`); ``precision`` "fp16" stores the
    weights as float16, each cast to float32 where the graph reads it (half the file; the runtime still
    computes in the precision it is asked for)."""
    import onnx

    spec = model.spec
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    images = torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size, device=dev)
    entries, carry = [], ()
    try:
        with exportable(model, resize), torch.no_grad(), warnings.catch_warnings():
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
                if precision == "fp16":
                    store_weights_fp16(out_dir / file)
                out = g(images, *carry)
                carry = tuple(out[1:]) if isinstance(out, tuple) else ()
                entries.append(stage_entry(i, file, names_in, names_out))
    finally:
        model.train(was)
    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "opset": int(opset)}
    return entries, versions, dict(BATCH_AXES)


# weights smaller than this stay float32: casting a bias or a scale costs a node and saves nothing
FP16_MIN_ELEMENTS = 1024


def store_weights_fp16(path: Path) -> None:
    """Rewrite the ONNX graph at ``path`` with its large float32 weights stored as float16, each read
    through a Cast to float32 (a decompression both ONNX Runtime and OpenVINO fold at load)."""
    import onnx
    from onnx import numpy_helper

    graph_model = onnx.load(str(path))
    g = graph_model.graph
    casts, kept = [], []
    for init in g.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < FP16_MIN_ELEMENTS:
            kept.append(init)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "_fp16")
        kept.append(half)
        casts.append(onnx.helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT,
                                           name=init.name + "_to_fp32"))
    del g.initializer[:]
    g.initializer.extend(kept)
    nodes = casts + list(g.node)  # the casts first: nodes stay in topological order
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(graph_model, str(path))
