"""Analytic MACs and parameter counts of a DVT cascade, from its spec alone (no framework import).

Convention: a MAC is one multiply-accumulate of a matrix product, linear layer, convolution (1x1 ones
included) or attention product: exactly what ``torch.utils.flop_counter.FlopCounterMode`` counts on
the torch backend, divided by 2 (fused attention counted as its two products), plus one per weighted
term of the reuse resize (``embedding_bag`` with per-sample weights: a gather and a weighted sum,
which FlopCounterMode does not see). Biases, other elementwise ops, softmax, exp, LayerNorm, GELU,
sums, concatenations, unfold and padding count nothing. Figures are per image (batch 1).

Every formula mirrors an op of ``dvt_backends/torch`` (named in the comments); ``tests/test_macs.py``
checks them against ``FlopCounterMode`` and the parameter counts against the torch model.

Public API:

- :func:`stage_macs` / :func:`exit_macs`: MACs of one stage (with its reuse modules) and the
  cumulative MACs to reach each exit.
- :func:`stage_params` / :func:`exit_params`: parameter counts, per stage and cumulative.
- :func:`macs_table`: one row per stage, for ``dvt flops``.
"""
from __future__ import annotations

import math
from typing import Union

from dvt_core.model.resample import token_resize_taps
from dvt_core.model.specs import CascadeSpec, StageSpec, T2TSpec
from dvt_core.model.zoo import get_spec

__all__ = ["stage_macs", "exit_macs", "stage_params", "exit_params", "macs_table",
           "tokenizer_macs", "block_macs", "feature_reuse_macs", "relation_reuse_macs", "token_resize_macs"]


def _spec(name_or_spec: Union[str, CascadeSpec], **overrides) -> CascadeSpec:
    return get_spec(name_or_spec, **overrides)


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    """``nn.Linear`` / 1x1 convolution over ``tokens`` positions (the bias counts nothing)."""
    return tokens * fan_in * fan_out


# ---- tokenizers ---------------------------------------------------------------------------------

def _performer_macs(tokens: int, dim: int, t2t: T2TSpec) -> int:
    """``TokenPerformer`` on ``tokens`` tokens of width ``dim`` (one-head random-feature attention)."""
    t, e, m = tokens, t2t.token_dim, t2t.performer_features
    return (_linear(t, dim, 3 * e)  # kqv
            + 2 * t * e * m  # _features: x @ w.T, for k and for q
            + t * m  # d = qp @ kp.sum(1): (T, m) @ (m, 1)
            + e * t * m  # kptv = v.T @ kp: (emb, T) @ (T, m)
            + t * m * e  # qp @ kptv.T: (T, m) @ (m, emb)
            + _linear(t, e, e)  # proj
            + _linear(t, e, e) + _linear(t, e, e))  # mlp fc1, fc2 (hidden = emb)


def _token_transformer_macs(tokens: int, dim: int, t2t: T2TSpec) -> int:
    """``TokenTransformer`` (T2T-ViT-t): one-head softmax attention that changes the width to emb."""
    t, e = tokens, t2t.token_dim
    return (_linear(t, dim, 3 * e)  # qkv
            + t * t * e  # q @ k.T
            + t * t * e  # attn @ v
            + _linear(t, e, e)  # proj
            + _linear(t, e, e) + _linear(t, e, e))  # mlp fc1, fc2 (hidden = emb)


def tokenizer_macs(stage: StageSpec, img_size: int, in_chans: int) -> int:
    """Image -> grid tokens: the patch-embedding convolution, or the whole tokens-to-token module."""
    if stage.family != "t2t":
        # PatchEmbed: conv, every output position does in_chans x k x k MACs per output channel
        k = stage.patch_kernel
        return stage.grid * stage.grid * in_chans * k * k * stage.embed_dim
    t2t = stage.t2t
    block = _performer_macs if t2t.token_type == "performer" else _token_transformer_macs
    g0, g1, g2 = t2t.split_grids(img_size)
    k0, k1, k2 = t2t.kernels
    return (block(g0 * g0, in_chans * k0 * k0, t2t)  # attention1 on the first soft split (unfold)
            + block(g1 * g1, t2t.token_dim * k1 * k1, t2t)  # attention2 on the second soft split
            + _linear(g2 * g2, t2t.token_dim * k2 * k2, stage.embed_dim))  # project the last split


# ---- transformer blocks and reuse modules -------------------------------------------------------

def block_macs(stage: StageSpec, reuse_dim: int = 0) -> int:
    """One ``Block`` on the stage's N = grid^2 + 1 tokens; its MLP reads ``reuse_dim`` extra features."""
    n, c = stage.num_tokens, stage.embed_dim
    return (_linear(n, c, 3 * c)  # attn.qkv
            + n * n * c  # q @ k.T: heads x (N, head_dim) @ (head_dim, N)
            + n * n * c  # softmax(logits) @ v: heads x (N, N) @ (N, head_dim)
            + _linear(n, c, c)  # attn.proj
            + _linear(n, c + reuse_dim, stage.mlp_hidden)  # mlp.fc1 on [tokens, reused features]
            + _linear(n, stage.mlp_hidden, c))  # mlp.fc2


def token_resize_macs(rows: int, old: int, new: int, channels: int = 1, class_token: str = "keep") -> int:
    """``TokenResize``: the weighted terms of dvt_core.model.resample.token_resize_taps (class token included),
    one multiply-accumulate each per channel, applied to ``rows`` sequences of ``old^2 + 1`` tokens."""
    return rows * token_resize_taps(old, new, class_token).nnz * channels


def feature_reuse_macs(spec: CascadeSpec, index: int, count_resize: bool = True) -> int:
    """Feature reuse of stage ``index``: a ``FeatureReuse`` MLP per block on the previous stage's tokens
    (class token included), then one ``TokenResize`` batched over the depth."""
    plan = spec.reuse_plan(index).feature
    if plan is None:
        return 0
    prev, st = spec.stages[index - 1], spec.stages[index]
    mlp = (_linear(prev.num_tokens, plan.in_dim, plan.hidden)  # FeatureReuse.fc1
           + _linear(prev.num_tokens, plan.hidden, plan.out_dim))  # FeatureReuse.fc2
    # Stage._reused_features: resize of (depth, B, n_prev, r), zero class-token row
    resize = token_resize_macs(st.depth, plan.old_grid, plan.new_grid, channels=plan.out_dim, class_token="zero")
    return st.depth * mlp + (resize if count_resize else 0)


def relation_reuse_macs(spec: CascadeSpec, index: int, count_resize: bool = True) -> int:
    """Relation reuse of stage ``index``: ``RelationReuse``'s two 1x1 convs (run as channel matmuls) on
    the previous stage's attention logits (previous grid), then the token resize of both axes."""
    plan = spec.reuse_plan(index).relation
    if plan is None:
        return 0
    prev, st = spec.stages[index - 1], spec.stages[index]
    n_prev, n = prev.num_tokens, st.num_tokens
    c_prev, hidden, c = plan.in_channels, plan.hidden_channels, plan.out_channels
    mix = (_linear(n_prev * n_prev, c_prev, hidden)  # expand: (C*e, C_prev) @ (C_prev, n_prev^2)
           + _linear(n_prev * n_prev, hidden, c))  # reduce: (C, C*e) @ (C*e, n_prev^2)
    resize = (token_resize_macs(c, plan.old_grid, plan.new_grid, channels=n_prev)  # queries axis -> (N, n_prev)
              + token_resize_macs(c, plan.old_grid, plan.new_grid, channels=n))  # keys axis -> (N, N)
    return mix + (resize if count_resize else 0)


def stage_macs(spec: Union[str, CascadeSpec], index: int, count_resize: bool = True) -> int:
    """MACs (per image) of running stage ``index`` on an image, given its reuse inputs.

    Tokenizer + blocks + head, plus this stage's own reuse modules (feature-reuse MLPs and resize,
    relation-reuse convs and resize). The previous stages are not included: see :func:`exit_macs`.
    Whether a stage keeps its attention logits for the next one changes no MACs (they are computed
    for its own attention anyway).

    ``count_resize=False`` leaves out the reuse resizes (gathers and weighted sums here; nearest
    upsampling and average pooling in the official code, which its MAC counts leave out): the official
    arithmetic.
    """
    spec = _spec(spec)
    st = spec.stages[index]
    reuse_dim = spec.feature_reuse_dim if spec.uses_feature_reuse(index) else 0
    return (tokenizer_macs(st, spec.img_size, spec.in_chans)
            + st.depth * block_macs(st, reuse_dim)
            + feature_reuse_macs(spec, index, count_resize)
            + relation_reuse_macs(spec, index, count_resize)
            + _linear(1, st.embed_dim, spec.num_classes))  # head on the class token


def _cumulative(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def exit_macs(name_or_spec: Union[str, CascadeSpec], count_resize: bool = True, **overrides) -> list[int]:
    """Cumulative MACs per image to produce each exit's prediction: exit k = stages 0..k.

    ``overrides`` go to :func:`dvt_core.model.zoo.get_spec`; ``count_resize``: see :func:`stage_macs`.

    >>> [round(m / 1e9, 3) for m in exit_macs("dvt_t2t_vit_12")]
    [0.468, 1.448, 3.464]
    >>> [round(m / 1e9, 3) for m in exit_macs("dvt_t2t_vit_12", count_resize=False)]
    [0.468, 1.446, 3.455]
    """
    spec = _spec(name_or_spec, **overrides)
    return _cumulative([stage_macs(spec, i, count_resize) for i in range(spec.num_exits)])


# ---- parameters ---------------------------------------------------------------------------------

def stage_params(spec: Union[str, CascadeSpec], index: int, trainable_only: bool = False) -> int:
    """Parameters of stage ``index`` (the sum of ``numel`` over the torch ``Stage``'s parameters).

    Frozen parameters that are part of the state dict count too: the Performer random features ``w``
    and the fixed sinusoid ``pos_embed`` of T2T stages. ``trainable_only=True`` leaves them out.
    Non-persistent buffers (the resize matrices) are not parameters. Counted from the spec's state
    table (:func:`dvt_core.model.shapes.state_shapes`).
    """
    from dvt_core.model.shapes import frozen_names, state_shapes

    spec = _spec(spec)
    prefix = f"stages.{index}."
    skip = frozen_names(spec) if trainable_only else set()
    return sum(math.prod(shape) for name, shape in state_shapes(spec).items()
               if name.startswith(prefix) and name not in skip)


def exit_params(name_or_spec: Union[str, CascadeSpec], trainable_only: bool = False, **overrides) -> list[int]:
    """Cumulative parameters needed to reach each exit (exit k = stages 0..k); see :func:`stage_params`."""
    spec = _spec(name_or_spec, **overrides)
    return _cumulative([stage_params(spec, i, trainable_only) for i in range(spec.num_exits)])


# ---- table --------------------------------------------------------------------------------------

def macs_table(name_or_spec: Union[str, CascadeSpec], **overrides) -> list[dict]:
    """One row per stage: ``stage`` (index), ``name``, ``grid`` ("7x7"), ``tokens`` (incl. class token),
    ``stage_macs``, ``exit_macs`` (cumulative), ``params``, ``trainable_params``, ``exit_params``
    (cumulative). MACs are per image, with the reuse resizes counted; ``overrides`` go to
    :func:`dvt_core.model.zoo.get_spec`."""
    spec = _spec(name_or_spec, **overrides)
    rows, macs_total, params_total = [], 0, 0
    for i, st in enumerate(spec.stages):
        m = stage_macs(spec, i)
        p = stage_params(spec, i)
        macs_total += m
        params_total += p
        rows.append({
            "stage": i,
            "name": f"{spec.name}[{i}]",
            "grid": f"{st.grid}x{st.grid}",
            "tokens": st.num_tokens,
            "stage_macs": m,
            "exit_macs": macs_total,
            "params": p,
            "trainable_params": stage_params(spec, i, trainable_only=True),
            "exit_params": params_total,
        })
    return rows
