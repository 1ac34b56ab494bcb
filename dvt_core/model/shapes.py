"""The state of a DVT from its spec alone: every canonical tensor name and its shape, no framework.

:func:`state_shapes` lists what a backend's ``model_state`` holds for a spec (same names, same
shapes, torch's ``state_dict`` order), so a checkpoint can be checked before any model is allocated.
:func:`state_diff` and :func:`check_state` compare a state dict (or a name -> shape table) with it:
the one place that decides what is missing, unexpected or mismatched, for the loaders of both
backends, ``convert`` and resuming a training run.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from dvt_core.errors import CheckpointError, list_problems
from dvt_core.model.specs import CascadeSpec, StageSpec

Shape = tuple[int, ...]


def _linear(name: str, n_out: int, n_in: int, bias: bool = True) -> Iterator[tuple[str, Shape]]:
    yield f"{name}.weight", (n_out, n_in)
    if bias:
        yield f"{name}.bias", (n_out,)


def _norm(name: str, dim: int) -> Iterator[tuple[str, Shape]]:
    yield f"{name}.weight", (dim,)
    yield f"{name}.bias", (dim,)


def _conv(name: str, n_out: int, n_in: int, kernel: int) -> Iterator[tuple[str, Shape]]:
    yield f"{name}.weight", (n_out, n_in, kernel, kernel)
    yield f"{name}.bias", (n_out,)


def _token_block(name: str, dim: int, stage: StageSpec) -> Iterator[tuple[str, Shape]]:
    """One token transformer of the T2T module: ``dim`` inputs per token, ``token_dim`` outputs."""
    t2t = stage.t2t
    emb = t2t.token_dim
    if t2t.token_type == "performer":
        yield f"{name}.w", (t2t.performer_features, emb)  # frozen random features, still in the state
        yield from _linear(f"{name}.kqv", 3 * emb, dim)
        yield from _linear(f"{name}.proj", emb, emb)
        yield from _norm(f"{name}.norm1", dim)
        yield from _norm(f"{name}.norm2", emb)
    else:
        yield from _norm(f"{name}.norm1", dim)
        yield from _linear(f"{name}.attn.qkv", 3 * emb, dim, bias=False)
        yield from _linear(f"{name}.attn.proj", emb, emb)
        yield from _norm(f"{name}.norm2", emb)
    yield from _linear(f"{name}.mlp.fc1", emb, emb)
    yield from _linear(f"{name}.mlp.fc2", emb, emb)


def _tokenizer(name: str, stage: StageSpec, in_chans: int) -> Iterator[tuple[str, Shape]]:
    if stage.family == "t2t":
        t2t = stage.t2t
        k0, k1, k2 = t2t.kernels
        yield from _token_block(f"{name}.attention1", in_chans * k0 * k0, stage)
        yield from _token_block(f"{name}.attention2", t2t.token_dim * k1 * k1, stage)
        yield from _linear(f"{name}.project", stage.embed_dim, t2t.token_dim * k2 * k2)
    else:
        yield from _conv(f"{name}.proj", stage.embed_dim, in_chans, stage.patch_kernel)


def _stage(spec: CascadeSpec, index: int) -> Iterator[tuple[str, Shape]]:
    st = spec.stages[index]
    p = f"stages.{index}"
    e = st.embed_dim
    plan = spec.reuse_plan(index)
    fr, rr = plan.feature, plan.relation
    yield f"{p}.cls_token", (1, 1, e)
    yield f"{p}.pos_embed", (1, st.num_tokens, e)
    yield from _tokenizer(f"{p}.tokenizer", st, spec.in_chans)
    if rr is not None:
        yield from _conv(f"{p}.relation_reuse.expand", rr.hidden_channels, rr.in_channels, 1)
        yield from _conv(f"{p}.relation_reuse.reduce", rr.out_channels, rr.hidden_channels, 1)
    r = fr.out_dim if fr is not None else 0
    for j in range(st.depth):
        b = f"{p}.blocks.{j}"
        yield from _norm(f"{b}.norm1", e)
        yield from _linear(f"{b}.attn.qkv", 3 * e, e, bias=st.qkv_bias)
        yield from _linear(f"{b}.attn.proj", e, e)
        yield from _norm(f"{b}.norm2", e + r)
        yield from _linear(f"{b}.mlp.fc1", st.mlp_hidden, e + r)
        yield from _linear(f"{b}.mlp.fc2", e, st.mlp_hidden)
        if fr is not None:
            yield from _norm(f"{b}.feature_reuse.norm", fr.in_dim)
            yield from _linear(f"{b}.feature_reuse.fc1", fr.hidden, fr.in_dim)
            yield from _linear(f"{b}.feature_reuse.fc2", fr.out_dim, fr.hidden)
    yield from _norm(f"{p}.norm", e)
    yield from _linear(f"{p}.head", spec.num_classes, e)


def state_shapes(spec: CascadeSpec) -> dict[str, Shape]:
    """Canonical name -> shape of every tensor in ``spec``'s state (parameters, frozen ones included).

    Computed from the spec alone, in the order of the torch backend's ``state_dict``; equal to what
    either backend's ``model_state`` returns (a test checks every zoo model).
    """
    spec.validate()
    out: dict[str, Shape] = {}
    for i in range(spec.num_exits):
        out.update(_stage(spec, i))
    return out


def frozen_names(spec: CascadeSpec) -> set[str]:
    """State entries that training never changes: the Performer's random features and sinusoid position tables."""
    out = set()
    for name in state_shapes(spec):
        stage = spec.stages[int(name.split(".")[1])]
        if name.endswith(".pos_embed") and stage.pos_embed == "sinusoid":
            out.add(name)
        elif stage.family == "t2t" and ".tokenizer.attention" in name and name.endswith(".w"):
            out.add(name)
    return out


def _shape(value) -> Shape:
    if isinstance(value, tuple) and all(isinstance(d, (int, np.integer)) for d in value):
        return tuple(int(d) for d in value)
    shape = getattr(value, "shape", None)  # any framework's tensor, without a copy
    return tuple(int(d) for d in (shape if shape is not None else np.shape(value)))


def state_diff(expected: Mapping[str, Shape], state: Mapping) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, mismatched)`` of ``state`` against the ``expected`` name -> shape table.

    ``state`` maps names to arrays (of any framework with a ``shape``) or to shape tuples. Mismatched
    entries read ``"name (have) vs (want)"``.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = []
    for k, want in expected.items():
        if k in state:
            have = _shape(state[k])
            if have != tuple(want):
                mismatched.append(f"{k} {have} vs {tuple(want)}")
    return missing, unexpected, mismatched


def check_state(expected: Mapping[str, Shape], state: Mapping, source: str = "checkpoint",
                model: str = "the model") -> None:
    """CheckpointError listing every missing, unexpected and mismatched tensor of ``state``; None if it fits."""
    missing, unexpected, mismatched = state_diff(expected, state)
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{source} does not match {model}: " + list_problems(missing, unexpected, mismatched),
                              missing, unexpected, mismatched)


def check_spec_state(spec: CascadeSpec, state: Mapping, source: str = "checkpoint") -> None:
    """:func:`check_state` against ``spec``'s shape table (no model is built)."""
    check_state(state_shapes(spec), state, source, spec.name)
