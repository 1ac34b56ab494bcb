"""Transformer blocks and the two reuse modules of DVT, in MindSpore.

Every width, epsilon and grid comes from a :class:`dvt_core.model.specs.StageSpec`; the resampling
matrices come from :mod:`dvt_core.model.resample`. Mirrors ``dvt_backends/torch/layers.py`` cell for module, so
parameter names are the torch ones (LayerNorm's ``gamma``/``beta`` aside; see dvt_core.checkpoint.naming).
"""
from __future__ import annotations

from dvt_core.model.resample import token_resize_matrix
from dvt_core.model.specs import FeatureReusePlan, RelationReusePlan, StageSpec

from . import compat as C


class Mlp(C.Cell):
    """fc1 -> GELU (the spec's flavour) -> fc2 (dropout after each, as in timm)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, drop: float = 0.0, gelu_flavour: str = "exact"):
        super().__init__()
        self.fc1 = C.dense(in_features, hidden)
        self.act = C.gelu(gelu_flavour)
        self.fc2 = C.dense(hidden, out_features)
        self.drop = C.dropout(drop)

    def construct(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(C.Cell):
    """Stochastic depth: drop whole residual branches per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def construct(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        return x * C.bernoulli_rows(x.shape[0], x.ndim, keep, x.dtype) / keep


class Attention(C.Cell):
    """Multi-head self-attention that also returns its pre-softmax logits (what relation reuse carries).

    Same arithmetic as torch's, computed head by head: each head's q, k, v come from its rows of the
    ``qkv`` weight and its output goes through its columns of ``proj``, so no activation is ever
    transposed (MindSpore's CPU transposes are slow). Logits travel head-major: a list of (B, N, N),
    and ``reused_logits`` is this block's (heads, B, N, N) slice of the relation-reuse output.
    MindSpore's fused attention (``ops.flash_attention_score``) exists for Ascend only, not for CPU or
    GPU, so every stage computes its logits explicitly (torch's fuses where they are not reused).
    """

    def __init__(self, stage: StageSpec):
        super().__init__()
        self.num_heads = stage.num_heads
        self.head_dim = stage.head_dim
        self.scale = stage.head_dim ** -0.5
        self.qkv = C.dense(stage.embed_dim, 3 * stage.embed_dim, bias=stage.qkv_bias)
        self.proj = C.dense(stage.embed_dim, stage.embed_dim)

    def construct(self, x, reused_logits=None):
        b, n, c = x.shape
        d = self.head_dim
        x2 = x.reshape(b * n, c)
        w, bias = self.qkv.weight, self.qkv.bias
        out = None
        logits = []
        for h in range(self.num_heads):
            q = C.linear_rows(x2, w, bias, h * d, d).reshape(b, n, d)
            k = C.linear_rows(x2, w, bias, c + h * d, d).reshape(b, n, d)
            v = C.linear_rows(x2, w, bias, 2 * c + h * d, d).reshape(b, n, d)
            lg = C.matmul_nt(q * self.scale, k)  # scale q (B, N, d), not the (B, N, N) logits: equal to rounding
            if reused_logits is not None:
                lg = lg + reused_logits[h]
            logits.append(lg)
            y = C.linear_cols(C.matmul(C.softmax(lg, -1), v).reshape(b * n, d), self.proj.weight, h * d, d)
            out = y if out is None else out + y
        return C.bias_add(out, self.proj.bias).reshape(b, n, c), logits


class FeatureReuse(C.Cell):
    """Per-block MLP over the previous stage's final tokens (LayerNorm -> fc1 -> GELU -> fc2).

    It runs on the previous (small) grid; the stage resamples all blocks' outputs at once. Where the
    plan says so (the MindSpore release) the LayerNorm's output is not used: fc1 reads the raw tokens.
    """

    def __init__(self, plan: FeatureReusePlan):
        super().__init__()
        self.norm = C.layer_norm(plan.in_dim, plan.ln_eps)
        self.apply_norm = plan.apply_norm
        self.fc1 = C.dense(plan.in_dim, plan.hidden)
        self.act = C.gelu(plan.gelu)
        self.fc2 = C.dense(plan.hidden, plan.out_dim)

    def construct(self, prev_tokens):
        x = self.norm(prev_tokens) if self.apply_norm else prev_tokens
        return self.fc2(self.act(self.fc1(x)))


class Block(C.Cell):
    """Pre-norm transformer block; with feature reuse, the MLP reads [tokens, reused features]."""

    def __init__(self, stage: StageSpec, reuse_dim: int = 0, drop_path: float = 0.0, feature_reuse=None,
                 gelu_flavour: str = "exact"):
        super().__init__()
        dim = stage.embed_dim
        self.norm1 = C.layer_norm(dim, stage.ln_eps)
        self.attn = Attention(stage)
        self.drop_path = DropPath(drop_path)
        self.norm2 = C.layer_norm(dim + reuse_dim, stage.ln_eps)
        self.mlp = Mlp(dim + reuse_dim, stage.mlp_hidden, dim, gelu_flavour=gelu_flavour)
        if feature_reuse is not None:
            self.feature_reuse = feature_reuse

    def construct(self, x, reused_features=None, reused_logits=None):
        y, logits = self.attn(self.norm1(x), reused_logits)
        x = x + self.drop_path(y)
        h = x if reused_features is None else C.cat((x, reused_features), 2)
        x = x + self.drop_path(self.mlp(self.norm2(h)))
        return x, logits


class TokenResize(C.Cell):
    """Moves token sequences (class token first) from one grid to another: ``matrix @ tokens``.

    The matrix comes from dvt_core.model.resample and equals the official nearest-upsample +
    adaptive-average-pool chain on the grid tokens; ``class_token`` says whether the class token is
    carried over ("keep", relation reuse) or zeroed ("zero", feature reuse). It is a constant tensor,
    not a parameter.

    Unlike torch's, which runs only the matrix's non-zero terms (dvt_core.model.resample.token_resize_taps)
    as gathers and weighted sums, this stays a dense product: MindSpore 2.10's CPU ``Gather`` made the
    tap form 10-40x slower than this product (2-core CPU, relation maps of 7 -> 10 and 10 -> 14 grids,
    batch 1 and 16). Same values; it spends more multiply-accumulates than ``exit_macs`` counts.
    """

    def __init__(self, old: int, new: int, class_token: str):
        super().__init__()
        self.left = C.LeftMatmul(token_resize_matrix(old, new, class_token))
        self.matrix = self.left.matrix

    def construct(self, x):
        """(..., n_old, C) -> (..., n_new, C)."""
        return self.left(x)


class RelationReuse(C.Cell):
    """Mixes the previous stage's attention logits (1x1-conv MLP over heads x depth) and resizes them.

    Relations are channel-major here, (heads x depth, B, n, n), so each head's map is one contiguous
    block: the 1x1 convolutions become plain matrix products over the channel axis and no transpose
    is needed anywhere (the weights keep the conv layout of the official checkpoints). The mixing
    runs on the small grid, before resampling (the cheap order). Output: (heads x depth, B, N, N)
    logits on this stage's grid.
    """

    def __init__(self, plan: RelationReusePlan):
        super().__init__()
        self.expand = C.conv2d(plan.in_channels, plan.hidden_channels, 1)
        self.act = C.gelu(plan.gelu)
        self.reduce = C.conv2d(plan.hidden_channels, plan.out_channels, 1)
        self.resize = TokenResize(plan.old_grid, plan.new_grid, "keep")

    def construct(self, prev_logits):
        c_in, b, n, _ = prev_logits.shape
        r = C.channel_mix(self.reduce, self.act(C.channel_mix(self.expand, prev_logits.reshape(c_in, -1))))
        c = r.shape[0]
        m = self.resize.matrix
        big = m.shape[0]
        r = C.matmul_nt(r.reshape(c * b * n, n), m)  # keys axis: (C*B*n, N)
        r = self.resize(r.reshape(c * b, n, big))  # queries axis: (C*B, N, N)
        return r.reshape(c, b, big, big)
