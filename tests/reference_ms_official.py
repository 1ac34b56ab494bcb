"""A test-only, functional model of the forward pass of the authors' MindSpore DVT code.

Written independently of ``dvt_core`` / ``backends`` so that the tests can check our cascade against
that code's arithmetic where the conformance fixtures say nothing (the two one-reuse ablations, other
widths and depths):

* it reads a state dict under that code's parameter names (``less_token.`` / ``normal_token.``,
  ``stem.patch_to_embedding.dense``, ``attn.to_q/to_k/to_v/to_out``, ``mlp.ff1/ff2.dense``,
  ``feature_resuse_mlp``, ``relation_reuse_conv.0/.2``, ``head.0``, LayerNorm ``gamma``/``beta``);
* it follows that code's operations: patches cut by reshape/transpose and fed to a Dense layer, separate
  q/k/v projections, nearest-neighbour resizes (``repeat_interleave``) of the grid tokens with the class
  token handled apart, tanh GELU, LayerNorm eps 1e-7, and the feature-reuse LayerNorm skipped (that
  code computes it and uses the raw tokens);
* :func:`ms_official_shapes` lists the names and shapes that code's ``save_checkpoint`` writes, in its
  order, from the module structure (validated against both ``.keys.json`` fixtures).

The spec is read only for numbers a state dict cannot tell (heads, which reuse is on).
"""
from __future__ import annotations

import zlib
from typing import Iterator

import numpy as np
import torch
from torch.nn import functional as F

STAGES = ("less_token", "normal_token")
LN_EPS = 1e-7  # mindspore.nn.LayerNorm's default
REUSE_HIDDEN, REUSE_OUT = 128, 48  # the feature-reuse MLP of that code


def ms_official_shapes(spec) -> list[tuple[str, tuple]]:
    """[(name, shape)] of the checkpoint that code writes for ``spec`` (two exits), in its order."""
    assert spec.num_exits == 2
    out = []
    for s, name in enumerate(STAGES):
        st = spec.stages[s]
        d, depth = st.embed_dim, st.depth
        p = st.patch_kernel
        fr = s == 1 and spec.feature_reuse
        out += [(f"{name}.cls_token", (1, 1, d)), (f"{name}.pos_embedding", (1, st.grid ** 2 + 1, d)),
                (f"{name}.stem.patch_to_embedding.dense.weight", (d, spec.in_chans * p * p)),
                (f"{name}.stem.patch_to_embedding.dense.bias", (d,))]
        for i in range(depth):
            b = f"{name}.layers.{i}"
            out += [(f"{b}.norm1.gamma", (d,)), (f"{b}.norm1.beta", (d,))]
            for t in ("to_q", "to_k", "to_v", "to_out"):
                out += [(f"{b}.attn.{t}.weight", (d, d)), (f"{b}.attn.{t}.bias", (d,))]
            w = d + (REUSE_OUT if fr else 0)
            h = int(d * st.mlp_ratio)
            out += [(f"{b}.norm2.gamma", (w,)), (f"{b}.norm2.beta", (w,)),
                    (f"{b}.mlp.ff1.dense.weight", (h, w)), (f"{b}.mlp.ff1.dense.bias", (h,)),
                    (f"{b}.mlp.ff2.dense.weight", (d, h)), (f"{b}.mlp.ff2.dense.bias", (d,))]
            if fr:
                f = f"{b}.feature_resuse_mlp"
                out += [(f"{f}.norm1.gamma", (d,)), (f"{f}.norm1.beta", (d,)),
                        (f"{f}.ff1.dense.weight", (REUSE_HIDDEN, d)), (f"{f}.ff1.dense.bias", (REUSE_HIDDEN,)),
                        (f"{f}.ff2.dense.weight", (REUSE_OUT, REUSE_HIDDEN)), (f"{f}.ff2.dense.bias", (REUSE_OUT,))]
        out += [(f"{name}.head.0.weight", (spec.num_classes, d)), (f"{name}.head.0.bias", (spec.num_classes,)),
                (f"{name}.norm.gamma", (d,)), (f"{name}.norm.beta", (d,))]
        if s == 1 and spec.relation_reuse:
            c = st.num_heads * depth
            out += [(f"{name}.relation_reuse_conv.0.weight", (3 * c, c, 1, 1)),
                    (f"{name}.relation_reuse_conv.0.bias", (3 * c,)),
                    (f"{name}.relation_reuse_conv.2.weight", (c, 3 * c, 1, 1)),
                    (f"{name}.relation_reuse_conv.2.bias", (c,))]
    return out


def ms_official_weight(name: str, shape) -> np.ndarray:
    """The conformance README's deterministic weight for one name of that code's checkpoints."""
    shape = tuple(shape)
    z = np.random.default_rng(zlib.crc32(name.encode("utf-8"))).standard_normal(shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("weight", "gamma") and len(shape) >= 2:
        z = z / np.sqrt(np.prod(shape[1:]))
    elif leaf == "gamma" or leaf == "weight":
        z = 1 + 0.1 * z
    elif leaf in ("bias", "beta"):
        z = 0.1 * z
    else:
        z = 0.02 * z
    return z.astype(np.float32)


def ms_official_state(shapes) -> dict:
    return {k: ms_official_weight(k, s) for k, s in shapes}


# ---- forward ------------------------------------------------------------------------------------------

def _gelu(x):
    return F.gelu(x, approximate="tanh")


def _dense(x, P, name):
    return F.linear(x, P[f"{name}.weight"], P[f"{name}.bias"])


def _ln(x, P, name):
    return F.layer_norm(x, x.shape[-1:], P[f"{name}.gamma"], P[f"{name}.beta"], LN_EPS)


def _nearest2(x):
    """(..., g, g) -> (..., 2g, 2g), every cell repeated 2x2 (ResizeNearestNeighbor to twice the side)."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def _stage(P, name, img, heads, feats=None, rels=None):
    b, c, hgt, wid = img.shape
    w = P[f"{name}.stem.patch_to_embedding.dense.weight"]
    p = int(round((w.shape[1] / c) ** 0.5))
    x = img.reshape(b, c, hgt // p, p, wid // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    x = _dense(x, P, f"{name}.stem.patch_to_embedding.dense")
    x = torch.cat((P[f"{name}.cls_token"].expand(b, -1, -1), x), 1) + P[f"{name}.pos_embedding"]
    n, d = x.shape[1], x.shape[2]
    depth = 1 + max(int(k.split(".")[2]) for k in P if k.startswith(f"{name}.layers."))
    relations = []
    for i in range(depth):
        L = f"{name}.layers.{i}"
        y = _ln(x, P, f"{L}.norm1")
        q, k, v = (_dense(y, P, f"{L}.attn.to_{t}").reshape(b, n, heads, d // heads).transpose(1, 2) for t in "qkv")
        a = (q @ k.transpose(-1, -2)) * (d // heads) ** -0.5
        if rels is not None:
            a = a + rels[:, i * heads:(i + 1) * heads]
        relations.append(a)
        o = (a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        x = x + _dense(o, P, f"{L}.attn.to_out")
        h = x
        if feats is not None:
            f = _dense(_gelu(_dense(feats, P, f"{L}.feature_resuse_mlp.ff1.dense")), P,
                       f"{L}.feature_resuse_mlp.ff2.dense")  # norm1 computed and discarded there: skipped
            g = int(round((f.shape[1] - 1) ** 0.5))
            grid = f[:, 1:].transpose(1, 2).reshape(b, -1, g, g)
            f = _nearest2(grid).reshape(b, f.shape[2], -1).transpose(1, 2)
            h = torch.cat((x, torch.cat((torch.zeros(b, 1, f.shape[2]), f), 1)), 2)
        x = x + _dense(_gelu(_dense(_ln(h, P, f"{L}.norm2"), P, f"{L}.mlp.ff1.dense")), P, f"{L}.mlp.ff2.dense")
    logits = _dense(_ln(x, P, f"{name}.norm")[:, 0], P, f"{name}.head.0")
    return logits, x, torch.cat(relations, 1)


def _relation_reuse(P, rel):
    """That code's relation_reuse_conv and the two nearest resizes, class-token row and column kept apart."""
    w0, b0 = P["normal_token.relation_reuse_conv.0.weight"], P["normal_token.relation_reuse_conv.0.bias"]
    w2, b2 = P["normal_token.relation_reuse_conv.2.weight"], P["normal_token.relation_reuse_conv.2.bias"]
    r = F.conv2d(_gelu(F.conv2d(rel, w0, b0)), w2, b2)  # (B, C, n, n)
    b, c, n, _ = r.shape
    g = int(round((n - 1) ** 0.5))
    keys = _nearest2(r[:, :, :, 1:].reshape(b, c, n, g, g)).reshape(b, c, n, -1)  # keys axis
    r = torch.cat((r[:, :, :, :1], keys), 3)  # (B, C, n, N)
    r = r.transpose(2, 3)  # (B, C, N, n): queries last
    queries = _nearest2(r[:, :, :, 1:].reshape(b, c, r.shape[2], g, g)).reshape(b, c, r.shape[2], -1)
    return torch.cat((r[:, :, :, :1], queries), 3).transpose(2, 3)


def ms_official_forward(state: dict, spec, images: torch.Tensor) -> list[torch.Tensor]:
    """Both exits' logits of that code, fed ``state`` (its names) and ``images``."""
    P = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}
    with torch.no_grad():
        l1, x, rel = _stage(P, "less_token", images, spec.stages[0].num_heads)
        rels = _relation_reuse(P, rel) if spec.relation_reuse else None
        l2, _, _ = _stage(P, "normal_token", images, spec.stages[1].num_heads,
                          x if spec.feature_reuse else None, rels)
    return [l1, l2]


def shapes_from_keys_json(doc) -> list[tuple[str, tuple]]:
    return [(k, tuple(s)) for k, s in doc["keys"]]


def iter_training_state(shapes) -> Iterator[tuple[str, np.ndarray]]:
    """What a training checkpoint of that code adds: Adam moments per parameter and optimizer scalars."""
    for prefix in ("adam_m", "adam_v"):
        for k, s in shapes:
            yield f"{prefix}.{k}", np.full(s, 0.5 if prefix == "adam_m" else 0.25, np.float32)
    yield "beta1_power", np.array([0.9 ** 3], np.float32)
    yield "beta2_power", np.array([0.999 ** 3], np.float32)
    yield "global_step", np.array([3], np.int32)
    yield "learning_rate", np.array(1e-3, np.float32)
