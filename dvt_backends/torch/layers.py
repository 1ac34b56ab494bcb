"""Transformer blocks and the two reuse modules of DVT, in PyTorch.

Every width, epsilon and grid comes from a :class:`dvt_core.model.specs.StageSpec`; the resampling
matrices come from :mod:`dvt_core.model.resample`. Mirrors ``dvt_backends/mindspore/layers.py``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from torch import nn
from torch.nn import functional as F

from dvt_core.model.resample import token_resize_matrix, token_resize_taps
from dvt_core.model.specs import FeatureReusePlan, RelationReusePlan, StageSpec


def gelu(flavour: str) -> nn.GELU:
    """The spec's GELU: "exact" (erf) or "tanh" (the tanh approximation)."""
    return nn.GELU(approximate="tanh" if flavour == "tanh" else "none")


def _in_graph_capture() -> bool:
    """Whether torch is tracing, exporting or compiling this code, or a dispatch mode watches it (FlopCounterMode,
    fake tensors): graphs and counters see the plain operators."""
    return (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or is_in_torch_dispatch_mode())


# oneDNN's prepacked linear for inference (Linear, RelationReuse); off to time the plain path beside it
PREPACK = {"enabled": torch.backends.mkldnn.is_available()}


def _can_prepack(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x`` times ``w`` may run on a prepacked weight: CPU inference in float32 or bfloat16, outside
    autograd and outside any graph capture (traced, exported and compiled graphs keep the plain operators)."""
    return (PREPACK["enabled"] and not torch.is_grad_enabled() and w.device.type == "cpu" and x.dtype == w.dtype
            and w.dtype in (torch.float32, torch.bfloat16) and x.dim() >= 2 and not _in_graph_capture())


# When a product runs on a prepacked weight (CPU inference), per dtype. oneDNN's prepacked linear costs about 20 us
# a call before any arithmetic (Intel Xeon with AMX, one thread), more than a small product takes: in float32
# ``F.linear`` is faster below about 8 M multiply-adds (rows x in x out; 6 against 25 us on 5 x 64 x 192). In
# bfloat16 every small product pays oneDNN's fixed cost either way (``F.linear`` 35 us there), so it runs in
# float32 on a float32 copy of the weight (11 us; the same products, rounded to bfloat16 once at the end). Both
# only for small weights: a large one read for a few rows costs its bytes (DeiT-S's 384 x 1000 head: 0.9 ms in
# float32 from a cold cache), which the prepacked bfloat16 layout halves.
PREPACK_MIN_MACS = {torch.float32: 1 << 23, torch.bfloat16: 1 << 19}
SMALL_WEIGHT = 1 << 17  # elements


class PrepackCache:
    """Mixin: weights laid out once for oneDNN's linear (``mkldnn._reorder_linear_weight``) or copied once to
    float32, kept beside the module and never saved. An entry is rebuilt when its tensor changes (another
    tensor, storage or version)."""

    def cached(self, name: str, t: torch.Tensor, make) -> torch.Tensor:
        cache = self.__dict__.setdefault("_packed_weights", {})
        entry = cache.get(name)
        if entry is None or entry[0] is not t or entry[1] != (t.data_ptr(), t._version):
            entry = cache[name] = (t, (t.data_ptr(), t._version), make(t.detach()))
        return entry[2]

    def packed(self, name: str, w: torch.Tensor) -> torch.Tensor:
        # a convolution's (out, in, kh, kw) as (out, in x kh x kw)
        return self.cached(name, w, lambda t: torch.ops.mkldnn._reorder_linear_weight(t.reshape(t.shape[0], -1), None))

    def linear(self, name: str, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
               gelu_approximate: Optional[str] = None) -> torch.Tensor:
        """``x @ w.T + bias`` (``w`` may be a convolution's weight: its trailing axes are flattened), then
        GELU where ``gelu_approximate`` says which ("none": erf, "tanh"), by the path with the least fixed cost
        for its size (``PREPACK_MIN_MACS``): on the prepacked weight, GELU fused in, in CPU inference."""
        if not _can_prepack(x, w):
            y = F.linear(x, w.flatten(1), bias)
            return y if gelu_approximate is None else F.gelu(y, approximate=gelu_approximate)
        if w.numel() >= SMALL_WEIGHT or x.numel() * w.shape[0] >= PREPACK_MIN_MACS[x.dtype]:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed(name, w), bias, "none" if gelu_approximate
                                                      is None else "gelu", [], gelu_approximate or "")
        if x.dtype == torch.float32:
            y = F.linear(x, w.flatten(1), bias)
        else:
            b32 = None if bias is None else self.cached(name + ".bias32", bias, lambda t: t.float())
            y = F.linear(x.float(), self.cached(name + ".32", w, lambda t: t.flatten(1).float()), b32)
        y = y if gelu_approximate is None else F.gelu(y, approximate=gelu_approximate)
        return y.to(x.dtype)

    def __getstate__(self):  # pickles and deep copies leave the cache out (oneDNN tensors do not pickle)
        state = self.__dict__.copy()
        state.pop("_packed_weights", None)
        return state


class Linear(PrepackCache, nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) that, in CPU inference, runs oneDNN's linear on a weight
    laid out once for it instead of ``addmm``, which lays the weight out for the matrix units at every call: at
    the 50 and 101 token rows of a cascade's small stages that work is not amortised (docs/performance.md).
    Products too small to gain from it take the path with the least fixed cost (``PrepackCache.linear``)."""

    def forward(self, x: torch.Tensor, gelu_approximate: Optional[str] = None) -> torch.Tensor:
        return self.linear("weight", x, self.weight, self.bias, gelu_approximate)


class Mlp(nn.Module):
    """fc1 -> GELU (the spec's flavour) -> fc2 (dropout after each, as in timm)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, drop: float = 0.0, gelu_flavour: str = "exact"):
        super().__init__()
        self.fc1 = Linear(in_features, hidden)
        self.act = gelu(gelu_flavour)
        self.fc2 = Linear(hidden, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.act, nn.GELU):  # the GELU rides in fc1's product where that runs prepacked
            return self.drop(self.fc2(self.drop(self.fc1(x, self.act.approximate))))
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop whole residual branches per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the keys. torch's CPU kernel works row by row, which for the few keys of a small grid
    (5 at 2x2 tokens) costs more than the whole-tensor form: in float32 inference, up to 8 keys, that form
    (max, exp, sum, divide; 2.2x faster on 256 x 5 x 5 logits, same values to 2e-7); elsewhere torch's."""
    if (logits.shape[-1] > 8 or logits.dtype != torch.float32 or torch.is_grad_enabled()
            or _in_graph_capture()):  # exported and compiled graphs keep Softmax
        return logits.softmax(dim=-1)
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


class FactoredLogits(NamedTuple):
    """A block's reused logits left as the factors of their product, ``left @ right^T`` (N x N per image and
    head), so that the second resize is never written out: the attention's explicit logits take them as extra
    columns of one product, ``[scale q, left] @ [k, right]^T`` = ``scale q k^T + left right^T``. In torch's own
    forward ``left`` is the resize matrix (N x n), the same for every block, and ``right`` the block's mixed
    logits resized along the keys (B, heads, N, n); an export's form may hold them the other way round."""

    left: torch.Tensor
    right: torch.Tensor


def _with_columns(a: torch.Tensor, extra: torch.Tensor, pad: int) -> torch.Tensor:
    """``[a, extra, 0 x pad]`` along the last axis: (rows, N, d) and (N, n) or (..., N, n) holding ``rows``
    matrices -> (rows, N, d + n + pad)."""
    rows, n = a.shape[0], a.shape[1]
    extra = extra.to(a.dtype).expand(rows, -1, -1) if extra.dim() == 2 else extra.reshape(rows, n, -1)
    parts = (a, extra) if not pad else (a, extra, a.new_zeros(()).expand(rows, n, pad))
    return torch.cat(parts, dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention that returns its pre-softmax logits when asked (relation reuse carries them).

    With ``need_logits=False`` (the last stage, a model without relation reuse, the static backbones)
    the logits are never materialised: the fused ``scaled_dot_product_attention`` runs, with the
    reused logits, if any, as its additive mask. Same arithmetic, same scale. Reused logits may come
    resized (B, heads, N, N) or factored (:class:`FactoredLogits`, explicit logits only).
    """

    def __init__(self, stage: StageSpec):
        super().__init__()
        self.num_heads = stage.num_heads
        self.scale = stage.head_dim ** -0.5
        self.qkv = Linear(stage.embed_dim, 3 * stage.embed_dim, bias=stage.qkv_bias)
        self.proj = Linear(stage.embed_dim, stage.embed_dim)

    def forward(self, x: torch.Tensor, reused_logits: Optional[torch.Tensor] = None, need_logits: bool = True):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if not need_logits:
            q, k, v = qkv[0], qkv[1], qkv[2]
            mask = None if reused_logits is None else reused_logits.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            return self.proj(y.transpose(1, 2).reshape(b, n, c)), None
        # explicit logits as 3-d batched products over (images x heads): one copy makes q, k, v contiguous,
        # the scale and the reused logits ride in the product (baddbmm: reused + scale * q k^T, the official
        # order of operations), and the softmax-weighted sum is one bmm
        h, d = self.num_heads, c // self.num_heads
        q, k, v = qkv.reshape(3, b * h, n, d).unbind(0)
        if isinstance(reused_logits, FactoredLogits):
            logits = self._factored_logits(q, k, reused_logits)
        elif reused_logits is None:
            logits = torch.bmm(q, k.transpose(1, 2)).mul_(self.scale)
        else:  # (B, heads, N, N), contiguous per block (RelationReuse lays the blocks out first)
            logits = torch.baddbmm(reused_logits.reshape(b * h, n, n), q, k.transpose(1, 2), alpha=self.scale)
        x = torch.bmm(_softmax(logits), v).view(b, h, n, d).transpose(1, 2).reshape(b, n, c)
        return self.proj(x), logits.view(b, h, n, n)

    def _factored_logits(self, q: torch.Tensor, k: torch.Tensor, reused: FactoredLogits) -> torch.Tensor:
        """``scale q k^T + left right^T`` as one batched product over the joined columns; in bfloat16 / float16
        the joined inner size is padded with zero columns to a multiple of 32 (the matrix units' step), which
        adds nothing to any sum. The scale multiplies q, exact where it is a power of two (head sizes 16, 64)."""
        d = q.shape[-1]
        width = d + reused.left.shape[-1]
        pad = 0 if q.dtype == torch.float32 else -width % 32
        qa = _with_columns(q, reused.left, pad)
        qa[..., :d].mul_(self.scale)
        ka = _with_columns(k, reused.right, pad)
        return torch.bmm(qa, ka.transpose(1, 2))


class FeatureReuse(nn.Module):
    """Per-block MLP over the previous stage's final tokens (LayerNorm -> fc1 -> GELU -> fc2).

    It runs on the previous (small) grid; the stage resamples all blocks' outputs at once. Where the
    plan says so (the MindSpore release) the LayerNorm's output is not used: fc1 reads the raw tokens.
    """

    def __init__(self, plan: FeatureReusePlan):
        super().__init__()
        self.norm = nn.LayerNorm(plan.in_dim, eps=plan.ln_eps)
        self.apply_norm = plan.apply_norm
        self.fc1 = Linear(plan.in_dim, plan.hidden)
        self.act = gelu(plan.gelu)
        self.fc2 = Linear(plan.hidden, plan.out_dim)

    def forward(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(prev_tokens) if self.apply_norm else prev_tokens
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; with feature reuse, the MLP reads [tokens, reused features]."""

    def __init__(self, stage: StageSpec, reuse_dim: int = 0, drop_path: float = 0.0,
                 feature_reuse: Optional[FeatureReuse] = None, gelu_flavour: str = "exact"):
        super().__init__()
        dim = stage.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=stage.ln_eps)
        self.attn = Attention(stage)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim + reuse_dim, eps=stage.ln_eps)
        self.mlp = Mlp(dim + reuse_dim, stage.mlp_hidden, dim, gelu_flavour=gelu_flavour)
        if feature_reuse is not None:
            self.feature_reuse = feature_reuse

    def forward(self, x: torch.Tensor, reused_features: Optional[torch.Tensor] = None,
                reused_logits: Optional[torch.Tensor] = None, need_logits: bool = True):
        y, logits = self.attn(self.norm1(x), reused_logits, need_logits)
        x = x + self.drop_path(y)
        h = x if reused_features is None else torch.cat((x, reused_features), dim=2)
        x = x + self.drop_path(self.mlp(self.norm2(h)))
        return x, logits


class TokenResize(nn.Module):
    """Moves token sequences (class token first) from one grid to another along axis -2.

    Each new token is a weighted sum of at most four old tokens (dvt_core.model.resample.token_resize_taps,
    equal to the official nearest-upsample + adaptive-average-pool chain on the grid tokens), run as
    one ``embedding_bag`` (a fused gather and weighted sum) over every sequence of the batch; narrow
    sequences (the reused features) are laid out tokens-first so that each term is one long row.
    ``class_token`` says whether the class token is carried over ("keep", relation reuse) or zeroed
    ("zero", feature reuse).
    """

    def __init__(self, old: int, new: int, class_token: str):
        super().__init__()
        taps = token_resize_taps(old, new, class_token)
        self.n_old, self.n_new, self.nnz = taps.n_old, taps.n_new, taps.nnz
        self.register_buffer("indices", torch.from_numpy(taps.indices), persistent=False)
        self.register_buffer("offsets", torch.from_numpy(taps.indptr[:-1].copy()), persistent=False)
        self.register_buffer("weights", torch.from_numpy(taps.weights), persistent=False)
        # the same resize as an (n_new, n_old) matrix: what FactoredLogits and the export's dense form multiply by
        self.register_buffer("matrix", torch.from_numpy(token_resize_matrix(old, new, class_token)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n_old, C) -> (..., n_new, C)."""
        lead, width = x.shape[:-2], x.shape[-1]
        if width < 64:  # narrow rows (reused features): tokens first, every sequence in one long row
            table = x.reshape(-1, self.n_old, width).transpose(0, 1).reshape(self.n_old, -1)
            out = F.embedding_bag(self.indices, table, self.offsets, mode="sum",
                                  per_sample_weights=self.weights.to(table.dtype))
            return out.reshape(self.n_new, -1, width).transpose(0, 1).reshape(lead + (self.n_new, width))
        table = x.reshape(-1, width)  # every sequence's tokens, one row each
        seqs = table.shape[0] // self.n_old
        base = torch.arange(seqs, device=x.device)[:, None]
        out = F.embedding_bag((base * self.n_old + self.indices).reshape(-1), table,
                              (base * self.nnz + self.offsets).reshape(-1), mode="sum",
                              per_sample_weights=self.weights.to(table.dtype).repeat(seqs))
        return out.reshape(lead + (self.n_new, width))


class RelationReuse(PrepackCache, nn.Module):
    """Mixes the previous stage's attention logits (1x1-conv MLP over heads x depth) and resizes them.

    The mixing runs on the small grid, before resampling (the cheap order), as matrix products over
    the channel axis (faster than a 1x1 convolution on CPU; the weights keep the conv layout of the
    official checkpoints). Output: (depth, B, heads, N, N) logits on this stage's grid, block by block.
    """

    def __init__(self, plan: RelationReusePlan, depth: int):
        super().__init__()
        self.expand = nn.Conv2d(plan.in_channels, plan.hidden_channels, kernel_size=1)
        self.act = gelu(plan.gelu)
        self.reduce = nn.Conv2d(plan.hidden_channels, plan.out_channels, kernel_size=1)
        self.resize = TokenResize(plan.old_grid, plan.new_grid, "keep")
        self.depth = depth  # this stage's blocks: out_channels = depth x heads, block-major

    @staticmethod
    def _mix(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, L) -> (B, C_out, L): a 1x1 convolution as one batched matrix product
        b, _, length = x.shape
        w = conv.weight.flatten(1)
        return torch.baddbmm(conv.bias[None, :, None].expand(b, -1, length), w.expand(b, -1, -1), x)

    def forward(self, prev_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """``prev_logits``: the previous stage's per-block logits, each (B, heads, n, n)."""
        r = self.mixed(prev_logits)  # (depth, B, heads, keys, queries)
        r = self.resize(r)  # keys axis: (depth, B, heads, N, n)
        return self.resize(r.transpose(-2, -1))  # queries axis: (depth, B, heads, N, N), contiguous

    def factored(self, prev_logits: Sequence[torch.Tensor]) -> tuple[FactoredLogits, ...]:
        """:meth:`forward` left unmultiplied, one :class:`FactoredLogits` per block: the resize matrix (N, n) and
        the block's mixed logits resized along the keys, (B, heads, N keys, n queries). Skipping the second
        resize and the (N x N) tensors it writes took DeiT-S stage 2 in bfloat16 from 283 to 57 ms at 64 images
        (with the logits' product; docs/performance.md)."""
        keys_resized = self.resize(self.mixed(prev_logits))  # (depth, B, heads, N, n)
        return tuple(FactoredLogits(self.resize.matrix, r) for r in keys_resized)

    def mixed(self, prev_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The mixed logits on the small grid, block by block: (depth, B, heads, keys, queries)."""
        if _can_prepack(prev_logits[0], self.expand.weight):
            return self._mixed_channels_last(prev_logits)
        # keys-major layout: the concatenation (a copy in any case) also transposes each block's logits,
        # so that the keys axis is resized first without a copy and the output comes out contiguous in
        # (queries, keys) order, the layout scaled_dot_product_attention reads its mask in without copying
        x = torch.cat(tuple(p.transpose(-2, -1) for p in prev_logits), dim=1)  # (B, C, keys, queries)
        b, c, n, _ = x.shape
        r = self._mix(self.reduce, self.act(self._mix(self.expand, x.reshape(b, c, n * n))))
        # blocks first, on the small grid (a copy there is cheap): each block's logits then come out as one
        # contiguous (B, heads, N, N) tensor, the (B x heads) batch Attention's products read without a copy
        return r.reshape(b, self.depth, -1, n, n).transpose(0, 1)  # (depth, B, heads, keys, queries)

    def _mixed_channels_last(self, prev_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """:meth:`mixed` in inference on prepacked weights: channels last, every (key, query) position a row,
        so that both products run as linears of many rows (the shape the matrix units want), with the bias
        and the GELU fused into the first. In DeiT-S stage 3 (72 -> 216 -> 72 channels over 101 x 101
        positions) 1.7x faster in bf16 and 2.8x in fp32 than the channel-major products with the GELU apart.
        The concatenation is the copy :meth:`mixed` makes in any case; the result is a view that the resize
        lays out in the order it reads (a copy on the small grid)."""
        x = torch.cat(tuple(p.permute(0, 3, 2, 1) for p in prev_logits), dim=-1)  # (B, keys, queries, C)
        b, n = x.shape[0], x.shape[1]
        h = torch.ops.mkldnn._linear_pointwise(x, self.packed("expand", self.expand.weight), self.expand.bias,
                                               "gelu", [], self.act.approximate)
        r = torch.ops.mkldnn._linear_pointwise(h, self.packed("reduce", self.reduce.weight), self.reduce.bias,
                                               "none", [], "")
        return r.reshape(b, n, n, self.depth, -1).permute(3, 0, 4, 1, 2)  # (depth, B, heads, keys, queries)
