"""``dvt_core.model.shapes``: the state's names and shapes from the spec alone, and the one state-dict diff.

The table is compared with what each backend really builds: torch for every full-size zoo model (on
torch's ``meta`` device, nothing allocated), both backends for the small overrides of every entry.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dvt_core
from dvt_core import CheckpointError, get_spec, list_models
from dvt_core.model.macs import exit_params, stage_params
from dvt_core.model.shapes import check_spec_state, frozen_names, state_diff, state_shapes

from helpers import small_overrides

ZOO = list_models()
REPO = Path(__file__).resolve().parents[1]


def _torch_model(spec, meta: bool = False):
    import torch

    from dvt_backends.torch import DVT

    if meta:
        with torch.device("meta"):
            return DVT(spec)
    return DVT(spec)


def _torch_shapes(spec, meta: bool = False) -> dict:
    return {k: tuple(v.shape) for k, v in _torch_model(spec, meta).state_dict().items()}


def _transformer_tokens(spec):
    """The same spec with T2T-ViT-t's softmax token transformers instead of Performers."""
    stages = tuple(dataclasses.replace(s, t2t=dataclasses.replace(s.t2t, token_type="transformer")) for s in spec.stages)
    return dataclasses.replace(spec, stages=stages).validate()


@pytest.mark.parametrize("name", ZOO)
def test_full_size_table_equals_the_torch_state_dict(name):
    spec = get_spec(name)
    want = state_shapes(spec)
    have = _torch_shapes(spec, meta=True)
    assert list(want) == list(have)  # same names, in state_dict order
    assert want == have


@pytest.mark.parametrize("name", ZOO)
def test_small_table_equals_the_torch_state_dict(name):
    spec = get_spec(name, **small_overrides(name), feature_reuse="t2t" in name)
    assert state_shapes(spec) == _torch_shapes(spec)
    if "t2t" in name:
        t = _transformer_tokens(spec)
        assert state_shapes(t) == _torch_shapes(t)


@pytest.mark.mindspore
@pytest.mark.parametrize("name", ZOO)
def test_small_table_equals_the_mindspore_state(name):
    pytest.importorskip("mindspore")
    from dvt_backends.mindspore import RUNTIME as bm

    spec = get_spec(name, **small_overrides(name))
    specs = [spec, get_spec(spec, relation_reuse=False)] + ([_transformer_tokens(spec)] if "t2t" in name else [])
    for s in specs:
        have = {k: tuple(v.shape) for k, v in bm.model_state(bm.build_model(s)).items()}
        assert state_shapes(s) == have


def test_parameter_count_of_the_official_t2t_12():
    # T2T-ViT-12 has 6.9M parameters (paper, Table 1); DVT stacks three exits of it, with reuse modules.
    spec = get_spec("dvt_t2t_vit_12")
    single = dvt_core.static_spec(spec, 2)
    assert 6.8e6 < stage_params(single, 0) < 7.0e6
    assert exit_params(spec)[-1] > 3 * stage_params(single, 0)


@pytest.mark.parametrize("name", ["dvt_t2t_vit_12", "dvt_deit_tiny"])
def test_frozen_entries_are_those_torch_does_not_train(name):
    spec = get_spec(name, **small_overrides(name))
    model = _torch_model(spec)
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert frozen_names(spec) == frozen
    assert bool(frozen) == ("t2t" in name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(stage_params(spec, i, trainable_only=True) for i in range(spec.num_exits)) == trainable


def test_the_table_needs_no_framework():
    code = ("import sys, dvt_core; from dvt_core.model.shapes import state_shapes; "
            "[state_shapes(dvt_core.get_spec(n)) for n in dvt_core.list_models()]; "
            "assert not {'torch', 'mindspore'} & set(sys.modules); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_diff_lists_missing_unexpected_and_mismatched():
    want = {"a": (2, 3), "b": (4,), "c": ()}
    state = {"a": np.zeros((3, 2)), "c": np.float32(1.0), "z": np.zeros(1)}
    missing, unexpected, mismatched = state_diff(want, state)
    assert missing == ["b"] and unexpected == ["z"] and mismatched == ["a (3, 2) vs (2, 3)"]
    assert state_diff(want, {"a": (2, 3), "b": (4,), "c": ()}) == ([], [], [])  # shapes stand for tensors


def test_check_names_every_problem_against_the_spec():
    spec = get_spec("dvt_fashion_mnist")
    state = {k: np.zeros(s, np.float32) for k, s in state_shapes(spec).items()}
    check_spec_state(spec, state)  # fits
    head = "stages.2.head.weight"
    state[head] = np.zeros((3, 3), np.float32)
    del state["stages.0.norm.bias"]
    state["extra.weight"] = np.zeros(1)
    with pytest.raises(CheckpointError, match=r"x.pt does not match dvt_fashion_mnist: 1 missing") as info:
        check_spec_state(spec, state, "x.pt")
    err = info.value
    assert err.missing == ["stages.0.norm.bias"] and err.unexpected == ["extra.weight"]
    assert err.mismatched == [f"{head} (3, 3) vs {state_shapes(spec)[head]}"]


def test_convert_checks_shapes_without_a_framework(tmp_path):
    """safetensors -> safetensors: checked against the spec's table, no torch or MindSpore model made."""
    shipped = REPO / "weights" / "dvt_fashion_mnist.safetensors"
    dst = tmp_path / "copy.safetensors"
    code = ("import sys, dvt_core; from dvt_core.checkpoint.convert import convert; "
            f"s = convert({str(shipped)!r}, {str(dst)!r}); "
            "assert not {'torch', 'mindspore'} & set(sys.modules), 'a framework was imported'; print(s['tensors'])")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout) == len(state_shapes(get_spec("dvt_fashion_mnist")))
    from dvt_core.checkpoint.files import write_checkpoint
    from dvt_core.checkpoint.convert import convert

    state = {k: np.zeros(v, np.float32) for k, v in state_shapes(get_spec("dvt_fashion_mnist")).items()}
    del state["stages.1.head.bias"]
    write_checkpoint(tmp_path / "bare.safetensors", state)  # no metadata: the architecture comes from --arch
    with pytest.raises(CheckpointError, match="does not match dvt_fashion_mnist: 1 missing: stages.1.head.bias"):
        convert(tmp_path / "bare.safetensors", tmp_path / "out.safetensors", arch="dvt_fashion_mnist")
    assert not (tmp_path / "out.safetensors").exists()
