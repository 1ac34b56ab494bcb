"""Image -> tokens: the ViT patch embedding and the T2T-ViT tokens-to-token module, in PyTorch.

Mirrors ``dvt_backends/mindspore/tokenizers.py``. Geometry (kernels, strides, paddings, grids) comes from
the stage spec.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from dvt_core.model.recipe import performer_feature_gain
from dvt_core.model.specs import StageSpec, T2TSpec

from .layers import Linear, Mlp, PrepackCache


class PatchEmbed(PrepackCache, nn.Module):
    """A strided convolution; the official 10x10 DeiT exit uses kernel 23 with padding 3.

    Where the patches do not overlap (kernel = stride, no padding: every other exit) the convolution is
    one matrix product over the patches cut out by a reshape: the same arithmetic, in the layout the
    tokens need, without oneDNN's convolution set-up (which cost the 2x2 stage of a 28x28 model 15 %
    of its time at batch 64, and as much as the rest of the stage's products at batch 1); in CPU inference on a
    prepacked weight where that pays (``PrepackCache.linear``: DeiT-S's 7x7 exit, 49 x 3072 x 384 in bfloat16,
    1.9 ms as ``addmm``).
    """

    def __init__(self, stage: StageSpec, in_chans: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, stage.embed_dim, kernel_size=stage.patch_kernel,
                              stride=stage.patch_stride, padding=stage.patch_padding)
        self.patches = stage.patch_kernel == stage.patch_stride and stage.patch_padding == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.patches:
            return self.proj(x).flatten(2).transpose(1, 2)
        b, c, h, w = x.shape
        k = self.proj.kernel_size[0]
        gh, gw = h // k, w // k  # a convolution drops the rows and columns no whole patch covers
        x = x[:, :, :gh * k, :gw * k].reshape(b, c, gh, k, gw, k).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
        return self.linear("proj", x, self.proj.weight, self.proj.bias)


class TokenPerformer(nn.Module):
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
        self.kqv = Linear(dim, 3 * emb)
        self.dp = nn.Dropout(t2t.dropout)
        self.proj = Linear(emb, emb)
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.norm2 = nn.LayerNorm(emb, eps=ln_eps)
        self.mlp = Mlp(emb, emb, emb, drop=t2t.dropout)
        w = torch.empty(self.m, emb)
        nn.init.orthogonal_(w)
        self.w = nn.Parameter(w * performer_feature_gain(t2t), requires_grad=False)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        # exp(w^T x - |x|^2 / 2) / sqrt(m): positive random features of the softmax kernel
        xd = (x * x).sum(dim=-1, keepdim=True) / 2
        return torch.exp(x @ self.w.t() - xd) / math.sqrt(self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        kp, qp = self._features(k), self._features(q)  # (B, T, m)
        d = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, T, 1)
        kptv = v.transpose(1, 2) @ kp  # (B, emb, m)
        y = (qp @ kptv.transpose(1, 2)) / (d + self.eps)  # (B, T, emb)
        y = v + self.dp(self.proj(y))
        return y + self.mlp(self.norm2(y))


class TokenAttention(nn.Module):
    """One-head softmax attention that changes the token width (T2T-ViT-t's tokens-to-token).

    Its scale is ``dim ** -0.5`` of the *input* width, as the official T2T code computes it.
    """

    def __init__(self, dim: int, emb: int):
        super().__init__()
        self.scale = dim ** -0.5
        self.qkv = Linear(dim, 3 * emb, bias=False)
        self.proj = Linear(emb, emb)
        self.emb = emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = torch.split(self.qkv(x), self.emb, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return v + self.proj(attn @ v)


class TokenTransformer(nn.Module):
    def __init__(self, dim: int, t2t: T2TSpec, ln_eps: float):
        super().__init__()
        emb = t2t.token_dim
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = TokenAttention(dim, emb)
        self.norm2 = nn.LayerNorm(emb, eps=ln_eps)
        self.mlp = Mlp(emb, emb, emb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TModule(nn.Module):
    """Soft split (unfold) -> token transformer -> re-structurise, twice, then a last split and projection."""

    def __init__(self, stage: StageSpec, in_chans: int):
        super().__init__()
        t2t = stage.t2t
        self.t2t = t2t
        block = TokenPerformer if t2t.token_type == "performer" else TokenTransformer
        k0, k1, k2 = t2t.kernels
        self.attention1 = block(in_chans * k0 * k0, t2t, t2t.ln_eps)
        self.attention2 = block(t2t.token_dim * k1 * k1, t2t, t2t.ln_eps)
        self.project = Linear(t2t.token_dim * k2 * k2, stage.embed_dim)

    def _split(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Soft split of a channels-last map (B, H, W, C) -> (B, L, C*k*k), features in F.unfold's order.

        Strided windows of the padded map and a single copy: on CPU about 4x faster than
        ``F.unfold`` followed by the transpose the tokens need.
        """
        t = self.t2t
        k, s, p = t.kernels[i], t.strides[i], t.paddings[i]
        x = F.pad(x, (0, 0, p, p, p, p))
        w = x.unfold(1, k, s).unfold(2, k, s)  # (B, oh, ow, C, k, k)
        b, oh, ow = w.shape[:3]
        return w.reshape(b, oh * ow, -1)

    @staticmethod
    def _grid(x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, HW, C) -> channels-last map (B, H, W, C): a view, no copy."""
        b, hw, c = x.shape
        side = math.isqrt(hw)
        return x.view(b, side, side, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention1(self._split(x.permute(0, 2, 3, 1), 0))
        x = self.attention2(self._split(self._grid(x), 1))
        return self.project(self._split(self._grid(x), 2))


def build_tokenizer(stage: StageSpec, in_chans: int) -> nn.Module:
    return T2TModule(stage, in_chans) if stage.family == "t2t" else PatchEmbed(stage, in_chans)
