"""A test-only, functional model of the official DVT PyTorch forward pass.

This file exists so the tests can check our cascade against the *official* arithmetic for models the
conformance fixtures do not cover (other depths, ablations without one kind of reuse, two exits,
other grids). It is written independently of ``dvt_core``/``backends``:

* it reads a state dict in the official key layout (``less_less_token.`` / ``less_token.`` /
  ``normal_token.`` stages, ``tokens_to_token`` or ``patch_embed`` tokenizers, the per-block
  ``feature_resuse_mlp`` and the per-stage ``relation_reuse_conv``);
* it uses the operations the official code uses: ``F.unfold`` soft splits and the transpose / reshape
  re-structurisation of T2T-ViT, the Performer's random-feature einsums, and for both kinds of reuse a
  nearest ``F.interpolate`` to an intermediate size followed by ``F.adaptive_avg_pool2d`` -- where
  the backend uses precomputed matrices instead;
* the official key names for any zoo spec come from :func:`official_shapes`, derived from the official
  module structure (parameters of a module before those of its children, children in registration
  order), not from ``dvt_core.checkpoint.naming``.

The spec is read only for numbers that a state dict cannot tell (head counts, unfold geometry,
LayerNorm eps, which reuse is on).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.nn import functional as F

# Stage attribute names of the official DVT models, in exit order.
OFFICIAL_STAGES = {3: ("less_less_token", "less_token", "normal_token"), 2: ("less_token", "normal_token")}

PERFORMER_EPS = 1e-8  # the official Token_performer's division guard
TOKEN_MODULE_LN_EPS = 1e-5  # the official token modules build nn.LayerNorm with its default eps


def stage_names(num_exits: int) -> tuple[str, ...]:
    if num_exits not in OFFICIAL_STAGES:
        raise ValueError(f"the official code has 2- and 3-exit models, not {num_exits}")
    return OFFICIAL_STAGES[num_exits]


def official_mid_size(old: int, new: int) -> int:
    """Side the official code upsamples a token map to before pooling it to ``new``.

    The official code hard-codes 14 for 7 -> 10 and 20 for 10 -> 14: double the old side. Doubling
    extends to any pair; when the new grid is larger than that, upsample straight to it.
    """
    return max(new, old + old)


# ---- official key layout ----------------------------------------------------------------------------

def _linear(name: str, n_out: int, n_in: int, bias: bool = True) -> Iterator[tuple[str, tuple]]:
    yield f"{name}.weight", (n_out, n_in)
    if bias:
        yield f"{name}.bias", (n_out,)


def _layernorm(name: str, n: int) -> Iterator[tuple[str, tuple]]:
    yield f"{name}.weight", (n,)
    yield f"{name}.bias", (n,)


def _token_module_keys(name: str, n_in: int, t2t) -> Iterator[tuple[str, tuple]]:
    """One official T2T token module (``Token_performer`` or ``Token_transformer``)."""
    emb = t2t.token_dim
    if t2t.token_type == "performer":
        # Token_performer: its own parameter ``w`` first, then kqv, proj, norm1, norm2, mlp (Sequential)
        yield f"{name}.w", (int(emb * t2t.kernel_ratio), emb)
        yield from _linear(f"{name}.kqv", 3 * emb, n_in)
        yield from _linear(f"{name}.proj", emb, emb)
        yield from _layernorm(f"{name}.norm1", n_in)
        yield from _layernorm(f"{name}.norm2", emb)
        yield from _linear(f"{name}.mlp.0", emb, emb)
        yield from _linear(f"{name}.mlp.2", emb, emb)
    else:
        # Token_transformer: norm1, attn (qkv without bias, proj), norm2, mlp (fc1, fc2; ratio 1)
        yield from _layernorm(f"{name}.norm1", n_in)
        yield from _linear(f"{name}.attn.qkv", 3 * emb, n_in, bias=False)
        yield from _linear(f"{name}.attn.proj", emb, emb)
        yield from _layernorm(f"{name}.norm2", emb)
        yield from _linear(f"{name}.mlp.fc1", emb, emb)
        yield from _linear(f"{name}.mlp.fc2", emb, emb)


def _stage_keys(spec, index: int) -> Iterator[tuple[str, tuple]]:
    st = spec.stages[index]
    dim = st.embed_dim
    reuse_features = spec.feature_reuse and index > 0
    reuse_relations = spec.relation_reuse and index > 0
    # T2T_ViT / VisionTransformer: own parameters first
    yield "cls_token", (1, 1, dim)
    yield "pos_embed", (1, st.grid * st.grid + 1, dim)
    if st.family == "t2t":
        t = st.t2t
        k0, k1, k2 = t.kernels
        yield from _token_module_keys("tokens_to_token.attention1", spec.in_chans * k0 * k0, t)
        yield from _token_module_keys("tokens_to_token.attention2", t.token_dim * k1 * k1, t)
        yield from _linear("tokens_to_token.project", dim, t.token_dim * k2 * k2)
    else:
        yield "patch_embed.proj.weight", (dim, spec.in_chans, st.patch_kernel, st.patch_kernel)
        yield "patch_embed.proj.bias", (dim,)
    wide = dim + (spec.feature_reuse_dim if reuse_features else 0)
    hidden = int(dim * st.mlp_ratio)
    prev_dim = spec.stages[index - 1].embed_dim if index > 0 else dim
    for j in range(st.depth):
        b = f"blocks.{j}"
        yield from _layernorm(f"{b}.norm1", dim)
        yield from _linear(f"{b}.attn.qkv", 3 * dim, dim, bias=st.qkv_bias)
        yield from _linear(f"{b}.attn.proj", dim, dim)
        yield from _layernorm(f"{b}.norm2", wide)
        yield from _linear(f"{b}.mlp.fc1", hidden, wide)
        yield from _linear(f"{b}.mlp.fc2", dim, hidden)
        if reuse_features:
            yield from _layernorm(f"{b}.feature_resuse_mlp.0", prev_dim)
            yield from _linear(f"{b}.feature_resuse_mlp.1.fc1", spec.feature_reuse_hidden, prev_dim)
            yield from _linear(f"{b}.feature_resuse_mlp.1.fc2", spec.feature_reuse_dim, spec.feature_reuse_hidden)
    yield from _layernorm("norm", dim)
    if reuse_relations:
        c_in = spec.stages[index - 1].num_heads * spec.stages[index - 1].depth
        c_out = st.num_heads * st.depth
        c_mid = c_out * spec.relation_reuse_expand
        yield "relation_reuse_conv.0.weight", (c_mid, c_in, 1, 1)
        yield "relation_reuse_conv.0.bias", (c_mid,)
        yield "relation_reuse_conv.2.weight", (c_out, c_mid, 1, 1)
        yield "relation_reuse_conv.2.bias", (c_out,)
    yield from _linear("head", spec.num_classes, dim)


def official_shapes(spec) -> list[tuple[str, tuple[int, ...]]]:
    """Every key of the official ``model_state_dict`` for ``spec``, in official order, with its shape."""
    out = []
    for i, prefix in enumerate(stage_names(spec.num_exits)):
        out += [(f"{prefix}.{k}", tuple(int(n) for n in shape)) for k, shape in _stage_keys(spec, i)]
    return out


def official_state(spec, weight_rule) -> dict[str, np.ndarray]:
    """An official-layout state dict for ``spec``, each tensor from ``weight_rule(key, shape)``."""
    return {k: weight_rule(k, shape) for k, shape in official_shapes(spec)}


# ---- the forward pass -------------------------------------------------------------------------------

class _Params:
    """Tensors of one official module, found by name under a prefix."""

    def __init__(self, state: dict, prefix: str = ""):
        self.state, self.prefix = state, prefix

    def __call__(self, name: str) -> torch.Tensor:
        return self.state[self.prefix + name]

    def opt(self, name: str):
        return self.state.get(self.prefix + name)

    def at(self, name: str) -> "_Params":
        return _Params(self.state, f"{self.prefix}{name}.")


def _ln(x, p: _Params, eps: float):
    return F.layer_norm(x, (x.shape[-1],), p("weight"), p("bias"), eps)


def _fc(x, p: _Params):
    return F.linear(x, p("weight"), p.opt("bias"))


def _two_layer(x, first: _Params, second: _Params):
    return _fc(F.gelu(_fc(x, first)), second)


def _performer(x, p: _Params):
    """Official Token_performer in eval mode: one-head linear attention with positive random features."""
    x = _ln(x, p.at("norm1"), TOKEN_MODULE_LN_EPS)
    emb = p("proj.weight").shape[0]
    k, q, v = torch.split(_fc(x, p.at("kqv")), emb, dim=-1)
    w = p("w")
    m = w.shape[0]

    def phi(t):  # exp(w.t - |t|^2 / 2) / sqrt(m)
        half_sq = (t * t).sum(dim=-1, keepdim=True) / 2
        return torch.exp(torch.einsum("btd,md->btm", t, w) - half_sq) / math.sqrt(m)

    kp, qp = phi(k), phi(q)
    denom = torch.einsum("btm,bm->bt", qp, kp.sum(dim=1)).unsqueeze(-1)
    kv = torch.einsum("btd,btm->bdm", v, kp)
    y = torch.einsum("btm,bdm->btd", qp, kv) / (denom + PERFORMER_EPS)
    y = v + _fc(y, p.at("proj"))  # the value is the skip connection (token width changes here)
    return y + _two_layer(_ln(y, p.at("norm2"), TOKEN_MODULE_LN_EPS), p.at("mlp.0"), p.at("mlp.2"))


def _token_transformer(x, p: _Params):
    """Official Token_transformer in eval mode: one-head softmax attention, scaled by its input width."""
    width = x.shape[-1]
    h = _ln(x, p.at("norm1"), TOKEN_MODULE_LN_EPS)
    emb = p("attn.proj.weight").shape[0]
    b, n, _ = h.shape
    q, k, v = _fc(h, p.at("attn.qkv")).reshape(b, n, 3, 1, emb).permute(2, 0, 3, 1, 4)
    a = ((q @ k.transpose(-2, -1)) * width ** -0.5).softmax(dim=-1)
    y = (a @ v).transpose(1, 2).reshape(b, n, emb)
    y = v.squeeze(1) + _fc(y, p.at("attn.proj"))
    return y + _two_layer(_ln(y, p.at("norm2"), TOKEN_MODULE_LN_EPS), p.at("mlp.fc1"), p.at("mlp.fc2"))


def _tokens_to_token(images, p: _Params, t2t):
    token_module = _performer if t2t.token_type == "performer" else _token_transformer
    x = images
    for i in range(3):
        tokens = F.unfold(x, kernel_size=t2t.kernels[i], stride=t2t.strides[i],
                          padding=t2t.paddings[i]).transpose(1, 2)
        if i == 2:
            return _fc(tokens, p.at("project"))
        tokens = token_module(tokens, p.at(f"attention{i + 1}"))
        b, hw, c = tokens.shape
        side = int(np.sqrt(hw))
        x = tokens.transpose(1, 2).reshape(b, c, side, side)


def _patch_embed(images, p: _Params, st):
    y = F.conv2d(images, p("proj.weight"), p("proj.bias"), stride=st.patch_stride, padding=st.patch_padding)
    return y.flatten(2).transpose(1, 2)


def _official_resize(maps, new: int):
    """(M, C, old, old) -> (M, C, new, new): nearest upsampling, then adaptive average pooling."""
    mid = official_mid_size(maps.shape[-1], new)
    return F.adaptive_avg_pool2d(F.interpolate(maps, size=(mid, mid), mode="nearest"), (new, new))


def _reused_relations(prev_relations: Sequence[torch.Tensor], p: _Params, new: int, depth: int):
    """The official relation reuse: mix the previous stage's logits, resample keys then queries."""
    r = torch.cat(list(prev_relations), dim=1)  # (B, heads x depth, n, n), block-major
    r = F.conv2d(F.gelu(F.conv2d(r, p("relation_reuse_conv.0.weight"), p("relation_reuse_conv.0.bias"))),
                 p("relation_reuse_conv.2.weight"), p("relation_reuse_conv.2.bias"))
    b, c, n, _ = r.shape
    old = int(np.sqrt(n - 1))
    big = new * new + 1
    # keys: every query row, grid columns resampled, class-token column kept
    cols = _official_resize(r[:, :, :, 1:].reshape(b * c, n, old, old), new).reshape(b * c, n, new * new)
    t = torch.cat((r[:, :, :, 0].reshape(b * c, n, 1), cols), dim=2).transpose(1, 2)  # (bc, big, n)
    # queries: now along the last axis, class-token query kept
    rows = _official_resize(t[:, :, 1:].reshape(b * c, big, old, old), new).reshape(b * c, big, new * new)
    t = torch.cat((t[:, :, 0:1], rows), dim=2).transpose(1, 2).reshape(b, c, big, big)
    return t.chunk(depth, dim=1)


def _reused_features(prev_x, p: _Params, new: int, eps: float):
    """One block's official feature reuse: MLP on the previous stage's tokens, resampled, zero class row."""
    f = _two_layer(_ln(prev_x, p.at("0"), eps), p.at("1.fc1"), p.at("1.fc2"))
    body = f[:, 1:, :]
    b, hw, c = body.shape
    old = int(np.sqrt(hw))
    body = _official_resize(body.transpose(1, 2).reshape(b, c, old, old), new).view(b, c, new * new)
    body = body.transpose(1, 2)
    return torch.cat((torch.zeros(b, 1, c, dtype=body.dtype), body), dim=1)


def _block(x, p: _Params, st, reused_x=None, reused_logits=None):
    b, n, c = x.shape
    heads = st.num_heads
    h = _ln(x, p.at("norm1"), st.ln_eps)
    q, k, v = _fc(h, p.at("attn.qkv")).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
    if reused_logits is not None:
        logits = logits + reused_logits
    y = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
    x = x + _fc(y, p.at("attn.proj"))
    h = x
    if reused_x is not None:
        h = torch.cat((x, _reused_features(reused_x, p.at("feature_resuse_mlp"), st.grid, st.ln_eps)), dim=2)
    x = x + _two_layer(_ln(h, p.at("norm2"), st.ln_eps), p.at("mlp.fc1"), p.at("mlp.fc2"))
    return x, logits


def _stage(images, p: _Params, st, prev_x=None, prev_relations=None):
    """One official T2T_ViT / VisionTransformer: (logits, final tokens, per-block attention logits)."""
    if st.family == "t2t":
        x = _tokens_to_token(images, p.at("tokens_to_token"), st.t2t)
    else:
        x = _patch_embed(images, p.at("patch_embed"), st)
    x = torch.cat((p("cls_token").expand(x.shape[0], -1, -1), x), dim=1) + p("pos_embed")
    reused = None
    if prev_relations is not None:
        reused = _reused_relations(prev_relations, p, st.grid, st.depth)
    relations = []
    for j in range(st.depth):
        x, logits = _block(x, p.at(f"blocks.{j}"), st, prev_x, None if reused is None else reused[j])
        relations.append(logits)
    out = _fc(_ln(x, p.at("norm"), st.ln_eps)[:, 0], p.at("head"))
    return out, x, relations


@torch.no_grad()
def official_forward(state: dict, spec, images) -> tuple[torch.Tensor, ...]:
    """Logits of every exit of the official DVT (eval mode) for ``state`` in the official layout.

    ``state`` maps official keys to numpy arrays or tensors; everything runs in ``images``' dtype.
    """
    images = torch.as_tensor(images)
    dtype = images.dtype
    tensors = {k: torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).to(dtype)
               for k, v in state.items()}
    outputs = []
    prev_x = prev_rel = None
    for i, name in enumerate(stage_names(spec.num_exits)):
        p = _Params(tensors, f"{name}.")
        logits, x, rel = _stage(images, p, spec.stages[i],
                                prev_x if (spec.feature_reuse and i > 0) else None,
                                prev_rel if (spec.relation_reuse and i > 0) else None)
        outputs.append(logits)
        prev_x, prev_rel = x, rel
    return tuple(outputs)
