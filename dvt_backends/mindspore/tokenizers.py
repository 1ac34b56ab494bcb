"""Image -> tokens: the ViT patch embedding and the T2T-ViT tokens-to-token module, in MindSpore.

Mirrors ``dvt_backends/torch/tokenizers.py``. Geometry (kernels, strides, paddings, grids) comes from
the stage spec.
"""
from __future__ import annotations

import math

from dvt_core.model.recipe import performer_feature_gain
from dvt_core.model.specs import StageSpec, T2TSpec

from . import compat as C
from .layers import Mlp


class PatchEmbed(C.Cell):
    """A strided convolution; the official 10x10 DeiT exit uses kernel 23 with padding 3."""

    def __init__(self, stage: StageSpec, in_chans: int):
        super().__init__()
        self.proj = C.conv2d(in_chans, stage.embed_dim, stage.patch_kernel, stage.patch_stride,
                             stage.patch_padding)

    def construct(self, x):
        y = self.proj(x)
        b, c = y.shape[0], y.shape[1]
        return C.swap_last(y.reshape(b, c, -1))


class TokenPerformer(C.Cell):
    """One-head Performer attention with positive random features (T2T-ViT's default).

    ``w`` (random orthogonal features) is a frozen parameter: it is part of every checkpoint.
    The residual is taken from ``v`` because the token width changes here.
    """

    def __init__(self, dim: int, t2t: T2TSpec, ln_eps: float):
        super().__init__()
        emb = t2t.token_dim
        self.emb = emb
        self.m = t2t.performer_features
        self.eps = t2t.performer_eps
        self.feature_scale = 1.0 / math.sqrt(self.m)
        self.kqv = C.dense(dim, 3 * emb)
        self.dp = C.dropout(t2t.dropout)
        self.proj = C.dense(emb, emb)
        self.norm1 = C.layer_norm(dim, ln_eps)
        self.norm2 = C.layer_norm(emb, ln_eps)
        self.mlp = Mlp(emb, emb, emb, drop=t2t.dropout)
        self.w = C.orthogonal_param((self.m, emb), gain=performer_feature_gain(t2t), requires_grad=False)

    def _features(self, x):
        # exp(w^T x - |x|^2 / 2) / sqrt(m): positive random features of the softmax kernel
        xd = (x * x).sum(axis=-1, keepdims=True) / 2
        return C.exp(C.matmul_nt(x, self.w) - xd) * self.feature_scale

    def construct(self, x):
        x = self.norm1(x)
        b, t, dim = x.shape
        x2 = x.reshape(b * t, dim)
        # k, q, v from their rows of the kqv weight: contiguous, no strided split of a wide output
        w, bias, e = self.kqv.weight, self.kqv.bias, self.emb
        k = C.linear_rows(x2, w, bias, 0, e).reshape(b, t, e)
        q = C.linear_rows(x2, w, bias, e, e).reshape(b, t, e)
        v = C.linear_rows(x2, w, bias, 2 * e, e).reshape(b, t, e)
        kp, qp = self._features(k), self._features(q)  # (B, T, m)
        d = C.matmul(qp, kp.sum(axis=1).expand_dims(-1))  # (B, T, 1)
        kptv = C.matmul_tn(v, kp)  # (B, emb, m)
        y = C.matmul_nt(qp, kptv) * C.reciprocal(d + self.eps)  # (B, T, emb); Div is slow on CPU
        y = v + self.dp(self.proj(y))
        return y + self.mlp(self.norm2(y))


class TokenAttention(C.Cell):
    """One-head softmax attention that changes the token width (T2T-ViT-t's tokens-to-token).

    Its scale is ``dim ** -0.5`` of the *input* width, as the official T2T code computes it.
    """

    def __init__(self, dim: int, emb: int):
        super().__init__()
        self.scale = dim ** -0.5
        self.qkv = C.dense(dim, 3 * emb, bias=False)
        self.proj = C.dense(emb, emb)
        self.emb = emb

    def construct(self, x):
        b, t, dim = x.shape
        x2 = x.reshape(b * t, dim)
        w, e = self.qkv.weight, self.emb
        q = C.linear_rows(x2, w, None, 0, e).reshape(b, t, e)
        k = C.linear_rows(x2, w, None, e, e).reshape(b, t, e)
        v = C.linear_rows(x2, w, None, 2 * e, e).reshape(b, t, e)
        attn = C.softmax(C.matmul_nt(q, k) * self.scale, -1)
        return v + self.proj(C.matmul(attn, v))


class TokenTransformer(C.Cell):
    def __init__(self, dim: int, t2t: T2TSpec, ln_eps: float):
        super().__init__()
        emb = t2t.token_dim
        self.norm1 = C.layer_norm(dim, ln_eps)
        self.attn = TokenAttention(dim, emb)
        self.norm2 = C.layer_norm(emb, ln_eps)
        self.mlp = Mlp(emb, emb, emb)

    def construct(self, x):
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TModule(C.Cell):
    """Soft split (unfold) -> token transformer -> re-structurise, twice, then a last split and projection.

    The grids between splits come from the spec (``T2TSpec.split_grids``), not from the tensors.
    """

    def __init__(self, stage: StageSpec, in_chans: int, img_size: int):
        super().__init__()
        t2t = stage.t2t
        self.kernels, self.strides, self.paddings = tuple(t2t.kernels), tuple(t2t.strides), tuple(t2t.paddings)
        self.grids = t2t.split_grids(img_size)
        block = TokenPerformer if t2t.token_type == "performer" else TokenTransformer
        k0, k1, k2 = t2t.kernels
        self.attention1 = block(in_chans * k0 * k0, t2t, t2t.ln_eps)
        self.attention2 = block(t2t.token_dim * k1 * k1, t2t, t2t.ln_eps)
        self.project = C.dense(t2t.token_dim * k2 * k2, stage.embed_dim)

    def _split(self, x, i: int):
        return C.swap_last(C.unfold(x, self.kernels[i], self.strides[i], self.paddings[i]))

    def _restructure(self, x, i: int):
        """(B, grid_i^2, C) tokens after split ``i`` -> (B, C, grid_i, grid_i)."""
        b, _, c = x.shape
        g = self.grids[i]
        return C.swap_last(x).reshape(b, c, g, g)

    def construct(self, x):
        x = self.attention1(self._split(x, 0))
        x = self.attention2(self._split(self._restructure(x, 0), 1))
        return self.project(self._split(self._restructure(x, 1), 2))


def build_tokenizer(stage: StageSpec, in_chans: int, img_size: int):
    return T2TModule(stage, in_chans, img_size) if stage.family == "t2t" else PatchEmbed(stage, in_chans)
