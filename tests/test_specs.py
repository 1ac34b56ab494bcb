"""dvt_core without a framework: specs, the zoo, overrides, validation and the reuse resize matrices."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dvt_core
from dvt_core import CascadeSpec, SpecError, get_spec, list_models
from dvt_core.model import resample
from dvt_core.model.resample import intermediate_size, resize_matrix

REPO = Path(__file__).resolve().parents[1]
REQUIRED_MODELS = ("dvt_t2t_vit_7", "dvt_t2t_vit_10", "dvt_t2t_vit_12", "dvt_t2t_vit_14", "dvt_t2t_vit_19",
                   "dvt_t2t_vit_24", "dvt_deit_tiny", "dvt_deit_small", "dvt_deit_base", "dvt_vit_base")
CORE_MODULES = ("model.specs", "model.zoo", "model.resample", "checkpoint.naming", "checkpoint.files",
                "runtime.builder", "errors", "runtime.early_exit", "runtime.contract", "model.shapes", "model.recipe",
                "runtime.streaming")
ZOO = list_models()


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def _small_overrides(spec: CascadeSpec) -> dict:
    grids = (2, 3, 4)[-spec.num_exits:] if spec.num_exits <= 3 else tuple(range(2, 2 + spec.num_exits))
    return dict(embed_dim=32, depth=1, num_heads=2, img_size=32, grids=grids, token_dim=16, num_classes=10)


# ---- no framework in dvt_core --------------------------------------------------------------------------

def test_core_imports_no_framework():
    core = REPO / "dvt_core"
    present = sorted(".".join(p.relative_to(core).with_suffix("").parts) for p in core.rglob("*.py")
                     if not p.stem.startswith("__"))
    assert set(CORE_MODULES) <= set(present), f"missing core modules: {set(CORE_MODULES) - set(present)}"
    imports = "; ".join(f"import dvt_core.{m}" for m in present)
    code = (f"import sys, dvt_core; {imports}; "
            "bad = sorted({'torch', 'mindspore', 'tensorflow', 'jax'} & set(sys.modules)); "
            "assert not bad, f'dvt_core imported {bad}'; "
            "s = dvt_core.get_spec('dvt_t2t_vit_12', num_classes=10); s.to_yaml(); "
            "dvt_core.model.resample.resize_matrix(7, 10); "
            "assert not {'torch', 'mindspore'} & set(sys.modules), 'a framework was imported on use'; print('ok')")
    r = _run(code)
    assert r.returncode == 0 and "ok" in r.stdout, f"modules {present}:\n{r.stderr[-3000:]}"


def test_torch_backend_never_imports_mindspore(tmp_path):
    path = tmp_path / "m.safetensors"
    code = ("import sys, torch, dvt_core; "
            "from dvt_backends.torch import RUNTIME; model_state = RUNTIME.model_state; "
            "from dvt_core.checkpoint.files import write_checkpoint; "
            "kw = dict(embed_dim=32, depth=1, num_heads=2, img_size=32, grids=(2, 3, 4), token_dim=16); "
            "m = dvt_core.build('dvt_t2t_vit_12', backend='torch', **kw).eval(); "
            "m(torch.zeros(1, 3, 32, 32)); "
            f"write_checkpoint({str(path)!r}, model_state(m)); "
            f"dvt_core.build('dvt_t2t_vit_12', weights={str(path)!r}, **kw); "
            "assert 'mindspore' not in sys.modules, 'mindspore was imported'; print('ok')")
    r = _run(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_unknown_backend_is_named():
    with pytest.raises(dvt_core.InputError, match="unknown backend 'jax'"):
        dvt_core.build("dvt_t2t_vit_12", backend="jax")


# ---- the zoo ----------------------------------------------------------------------------------------

def test_list_models_has_every_required_model():
    assert set(REQUIRED_MODELS) <= set(ZOO), f"missing: {sorted(set(REQUIRED_MODELS) - set(ZOO))}"
    assert ZOO == sorted(ZOO)
    assert list_models("deit") == ["dvt_deit_base", "dvt_deit_small", "dvt_deit_tiny", "dvt_ms_deit_small"]


@pytest.mark.parametrize("name", REQUIRED_MODELS)
def test_official_geometry(name):
    spec = get_spec(name)
    assert spec.img_size == 224 and spec.num_classes == 1000
    if name == "dvt_vit_base":
        assert spec.grids == (7, 14)
    else:
        assert spec.grids == (7, 10, 14)
    assert spec.feature_reuse and spec.relation_reuse
    for st in spec.stages:
        if st.family == "t2t":
            splits = {7: (14, 8, 3), 10: (11, 6, 5), 14: (7, 4, 2)}[st.grid]
            assert (st.t2t.kernels[0], st.t2t.strides[0], st.t2t.paddings[0]) == splits
            assert st.ln_eps == 1e-5 and not st.qkv_bias and st.pos_embed == "sinusoid"
        else:
            patch = {7: (32, 0), 10: (23, 3), 14: (16, 0)}[st.grid]
            assert (st.patch_kernel, st.patch_padding) == patch and st.patch_stride == st.patch_kernel
            assert st.ln_eps == 1e-6 and st.qkv_bias and st.pos_embed == "learned"


@pytest.mark.parametrize("name", ZOO)
def test_yaml_and_dict_round_trip(name):
    spec = get_spec(name)
    assert CascadeSpec.from_yaml(spec.to_yaml()) == spec
    assert CascadeSpec.from_dict(spec.to_dict()) == spec
    small = get_spec(name, **_small_overrides(spec), feature_reuse=False)
    assert CascadeSpec.from_yaml(small.to_yaml()) == small


@pytest.mark.parametrize("name", ZOO)
def test_overrides_apply_to_every_entry(name):
    spec = get_spec(name)
    n = spec.num_exits
    assert not get_spec(name, feature_reuse=False).feature_reuse
    assert not get_spec(name, relation_reuse=False).relation_reuse
    plain = get_spec(name, feature_reuse=False, relation_reuse=False)
    assert not plain.uses_feature_reuse(1) and not plain.uses_relation_reuse(1)
    assert get_spec(name, num_classes=10).num_classes == 10
    for size in (spec.img_size * 2, spec.img_size + spec.img_size // 2):
        s = get_spec(name, img_size=size)
        assert s.img_size == size and s.grids == spec.grids
        assert all(st.tokenizer_grid(size) == st.grid for st in s.stages)
    grids = tuple(g + 1 for g in spec.grids)
    s = get_spec(name, grids=grids)
    assert s.grids == grids and all(st.tokenizer_grid(s.img_size) == st.grid for st in s.stages)
    s = get_spec(name, img_size=spec.img_size * 2, grids=tuple(2 * g for g in spec.grids), num_classes=3)
    assert s.grids == tuple(2 * g for g in spec.grids) and s.num_classes == 3
    assert s.stages[0].embed_dim == spec.stages[0].embed_dim and len(s.stages) == n
    # the zoo entry itself is untouched
    assert get_spec(name) == spec


@pytest.mark.parametrize("name", ZOO)
def test_small_model_of_every_entry_runs(name):
    import torch

    spec = get_spec(name)
    overrides = _small_overrides(spec)
    model = dvt_core.build(name, **overrides).eval()
    assert model.spec == get_spec(name, **overrides)
    with torch.no_grad():
        out = model(torch.zeros(1, spec.in_chans, 32, 32))
    assert [tuple(o.shape) for o in out] == [(1, 10)] * spec.num_exits


def test_static_spec_is_one_plain_stage():
    spec = get_spec("dvt_deit_small")
    static = dvt_core.static_spec(spec, 1)
    assert static.num_exits == 1 and static.stages[0] == spec.stages[1]
    assert not static.feature_reuse and not static.relation_reuse


# ---- impossible combinations ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,overrides,pattern", [
    ("dvt_t2t_vit_12", dict(grids=(14, 10, 7)), r"must not shrink.*\(14, 10, 7\)"),
    ("dvt_deit_small", dict(grids=(7, 7, 5)), r"must not shrink"),
    ("dvt_t2t_vit_12", dict(grids=(7, 14)), r"3 exits; grids=\(7, 14\) names 2"),
    ("dvt_vit_base", dict(grids=(7, 10, 14)), r"2 exits; grids=\(7, 10, 14\) names 3"),
    ("dvt_deit_small", dict(embed_dim=100, num_heads=3), r"embed_dim 100 is not divisible by num_heads 3"),
    ("dvt_t2t_vit_12", dict(depht=3), r"unknown override\(s\) \['depht'\]"),
    ("dvt_t2t_vit_12", dict(num_classes=0), r"num_classes must be >= 1"),
    ("dvt_deit_tiny", dict(img_size=8, grids=(7, 10, 14)), r"impossible for a 8-pixel image"),
    ("dvt_deit_tiny", dict(in_chans=2, mean=(0.5,)), r"one value per input channel"),
    ("dvt_t2t_vit_12", dict(grids=(0, 10, 14)), r"grid"),
])
def test_impossible_overrides_are_named(name, overrides, pattern):
    with pytest.raises(SpecError, match=pattern):
        get_spec(name, **overrides)
    with pytest.raises(SpecError, match=pattern):  # build checks before touching a framework
        dvt_core.build(name, **overrides)


def test_unknown_model_suggests_the_closest():
    with pytest.raises(SpecError, match=r"unknown model 'dvt_t2t_vit12'.*did you mean dvt_t2t_vit_12"):
        get_spec("dvt_t2t_vit12")
    with pytest.raises(SpecError, match=r"unknown model 'resnet50'; known: .*dvt_deit_small"):
        dvt_core.build("resnet50")


def test_relation_reuse_needs_equal_heads_times_depth():
    spec = get_spec("dvt_deit_tiny", embed_dim=32, depth=2, num_heads=2, img_size=32, grids=(2, 3, 4))
    deeper = dataclasses.replace(spec.stages[2], depth=3)
    uneven = dataclasses.replace(spec, stages=spec.stages[:2] + (deeper,))
    with pytest.raises(SpecError, match=r"heads x depth \(4\) onto stage 2's \(6\).*relation_reuse=False"):
        uneven.validate()
    with pytest.raises(SpecError, match="heads x depth"):
        get_spec(uneven)
    fine = get_spec(uneven, relation_reuse=False)  # without relation reuse the stages may differ
    assert fine.stages[2].depth == 3


def test_spec_fields_are_checked_on_load():
    d = get_spec("dvt_deit_tiny").to_dict()
    with pytest.raises(SpecError, match="unknown cascade spec fields: \\['colour'\\]"):
        CascadeSpec.from_dict(dict(d, colour="red"))
    d["stages"][0]["heads"] = 3
    with pytest.raises(SpecError, match="unknown stage spec fields: \\['heads'\\]"):
        CascadeSpec.from_dict(d)
    d = get_spec("dvt_deit_tiny").to_dict()
    d["stages"][1].update(patch_kernel=16, patch_stride=16)
    with pytest.raises(SpecError, match="stage 1: its tokenizer turns a 224x224 image into a 14x14 grid, "
                                        "not the 10x10"):
        CascadeSpec.from_dict(d)


# ---- resize matrices vs the official interpolate + pool ---------------------------------------------------

def _official_resize_2d(old: int, new: int, mid: int) -> np.ndarray:
    """(new*new, old*old) matrix of nearest upsampling to ``mid`` then adaptive average pooling to ``new``."""
    import torch
    from torch.nn import functional as F

    basis = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    up = F.interpolate(basis, size=(mid, mid), mode="nearest")
    return F.adaptive_avg_pool2d(up, (new, new)).reshape(old * old, new * new).T.numpy()


def test_official_intermediate_sizes():
    assert intermediate_size(7, 10) == 14
    assert intermediate_size(10, 14) == 20
    assert intermediate_size(7, 14) == 14


_RNG = np.random.default_rng(2021)
_RANDOM_PAIRS = sorted({(int(o), int(o + d)) for o, d in zip(_RNG.integers(1, 17, 8), _RNG.integers(0, 20, 8))})


# The official code's hard-coded upsampling sizes (7 -> 14 -> 10, 10 -> 20 -> 14, 7 -> 14 -> 14).
OFFICIAL_MID = {(7, 10): 14, (10, 14): 20, (7, 14): 14}


@pytest.mark.parametrize("old,new", [(7, 10), (10, 14), (7, 14), (2, 3), (3, 5), (5, 8), (7, 7)] + _RANDOM_PAIRS)
def test_resize_matrix_equals_official_interpolate_and_pool(old, new):
    """One matrix product equals torch's nearest upsampling + adaptive average pooling: at the official
    sizes for the official pairs (so the matrix reproduces the release), at ``intermediate_size`` for others."""
    mid = OFFICIAL_MID.get((old, new), intermediate_size(old, new))
    official = _official_resize_2d(old, new, mid)
    r = resize_matrix(old, new)
    assert r.dtype == np.float32 and r.shape == (new, old)
    ours = np.kron(r.astype(np.float64), r.astype(np.float64))  # separable: rows x columns
    np.testing.assert_allclose(ours, official, rtol=0, atol=5e-7)
    np.testing.assert_allclose(resize_matrix(old, new, np.float64).sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("old,new", [(7, 10), (10, 14), (7, 14), (3, 5)])
def test_token_resize_matrix_places_the_class_token_like_the_official_code(old, new):
    """Token-sequence matrices: grid block = official 2-D resize; class token kept (relations) or zero
    (features), never mixed with grid tokens."""
    grid = _official_resize_2d(old, new, intermediate_size(old, new))
    for mode, corner in (("keep", 1.0), ("zero", 0.0)):
        m = resample.token_resize_matrix(old, new, mode).astype(np.float64)
        assert m.shape == (new * new + 1, old * old + 1)
        assert m[0, 0] == corner and not m[0, 1:].any() and not m[1:, 0].any()
        np.testing.assert_allclose(m[1:, 1:], grid, rtol=0, atol=5e-7)
    with pytest.raises(ValueError, match="class_token"):
        resample.token_resize_matrix(old, new, "drop")


def test_resize_matrix_rejects_empty_grids():
    with pytest.raises(ValueError, match="positive"):
        resize_matrix(0, 4)
