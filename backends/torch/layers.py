"""Transformer blocks and the two reuse modules of DVT, in PyTorch.

Every width, epsilon and grid comes from a :class:`dvt_core.specs.StageSpec`; the resampling
matrices come from :mod:`dvt_core.resample`. Mirrors ``backends/mindspore/layers.py``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from dvt_core.resample import token_resize_matrix
from dvt_core.specs import FeatureReusePlan, RelationReusePlan, StageSpec


def gelu(flavour: str) -> nn.GELU:
    """The spec's GELU: "exact" (erf) or "tanh" (the tanh approximation)."""
    return nn.GELU(approximate="tanh" if flavour == "tanh" else "none")


class Mlp(nn.Module):
    """fc1 -> GELU (the spec's flavour) -> fc2 (dropout after each, as in timm)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, drop: float = 0.0, gelu_flavour: str = "exact"):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = gelu(gelu_flavour)
        self.fc2 = nn.Linear(hidden, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


class Attention(nn.Module):
    """Multi-head self-attention that also returns its pre-softmax logits (what relation reuse carries)."""

    def __init__(self, stage: StageSpec):
        super().__init__()
        self.num_heads = stage.num_heads
        self.scale = stage.head_dim ** -0.5
        self.qkv = nn.Linear(stage.embed_dim, 3 * stage.embed_dim, bias=stage.qkv_bias)
        self.proj = nn.Linear(stage.embed_dim, stage.embed_dim)

    def forward(self, x: torch.Tensor, reused_logits: Optional[torch.Tensor] = None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * self.scale
        if reused_logits is not None:
            logits = logits + reused_logits
        x = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x), logits


class FeatureReuse(nn.Module):
    """Per-block MLP over the previous stage's final tokens (LayerNorm -> fc1 -> GELU -> fc2).

    It runs on the previous (small) grid; the stage resamples all blocks' outputs at once. Where the
    plan says so (the MindSpore release) the LayerNorm's output is not used: fc1 reads the raw tokens.
    """

    def __init__(self, plan: FeatureReusePlan):
        super().__init__()
        self.norm = nn.LayerNorm(plan.in_dim, eps=plan.ln_eps)
        self.apply_norm = plan.apply_norm
        self.fc1 = nn.Linear(plan.in_dim, plan.hidden)
        self.act = gelu(plan.gelu)
        self.fc2 = nn.Linear(plan.hidden, plan.out_dim)

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
                reused_logits: Optional[torch.Tensor] = None):
        y, logits = self.attn(self.norm1(x), reused_logits)
        x = x + self.drop_path(y)
        h = x if reused_features is None else torch.cat((x, reused_features), dim=2)
        x = x + self.drop_path(self.mlp(self.norm2(h)))
        return x, logits


class TokenResize(nn.Module):
    """Moves token sequences (class token first) from one grid to another: ``matrix @ tokens``.

    The matrix comes from dvt_core.resample and equals the official nearest-upsample +
    adaptive-average-pool chain on the grid tokens; ``class_token`` says whether the class token is
    carried over ("keep", relation reuse) or zeroed ("zero", feature reuse).
    """

    def __init__(self, old: int, new: int, class_token: str):
        super().__init__()
        self.register_buffer("matrix", torch.from_numpy(token_resize_matrix(old, new, class_token)),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n_old, C) -> (..., n_new, C)."""
        return torch.matmul(self.matrix, x)


class RelationReuse(nn.Module):
    """Mixes the previous stage's attention logits (1x1-conv MLP over heads x depth) and resizes them.

    The mixing runs on the small grid, before resampling (the cheap order), as matrix products over
    the channel axis (faster than a 1x1 convolution on CPU; the weights keep the conv layout of the
    official checkpoints). Output: (B, heads x depth, N, N) logits on this stage's grid.
    """

    def __init__(self, plan: RelationReusePlan):
        super().__init__()
        self.expand = nn.Conv2d(plan.in_channels, plan.hidden_channels, kernel_size=1)
        self.act = gelu(plan.gelu)
        self.reduce = nn.Conv2d(plan.hidden_channels, plan.out_channels, kernel_size=1)
        self.resize = TokenResize(plan.old_grid, plan.new_grid, "keep")

    @staticmethod
    def _mix(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, L) -> (B, C_out, L): a 1x1 convolution as one batched matrix product
        b, _, length = x.shape
        w = conv.weight.flatten(1)
        return torch.baddbmm(conv.bias[None, :, None].expand(b, -1, length), w.expand(b, -1, -1), x)

    def forward(self, prev_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """``prev_logits``: the previous stage's per-block logits, each (B, heads, n, n)."""
        x = torch.cat(tuple(prev_logits), dim=1)
        b, c, n, _ = x.shape
        r = self._mix(self.reduce, self.act(self._mix(self.expand, x.reshape(b, c, n * n))))
        r = r.reshape(b, -1, n, n)
        m = self.resize.matrix
        return torch.matmul(m, torch.matmul(r, m.t()))  # keys axis, then queries axis
