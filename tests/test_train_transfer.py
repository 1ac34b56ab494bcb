"""Starting training from another model's weights (dvt_core.checkpoint.transfer) and the optimizer's parameter groups.

Resampling is checked against torch's own bicubic interpolation (an independent implementation), and
the patch-kernel resize by its defining property: the new kernel's response to a resized patch equals
the old kernel's response to the patch.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dvt_core
from dvt_backends.torch.cascade import DVT
from dvt_backends.torch.io import model_state
from dvt_backends.torch.train import optimizer_groups
from dvt_core.checkpoint.files import write_checkpoint
from dvt_core.errors import CheckpointError
from dvt_core.checkpoint.transfer import (adapt_in_chans, bicubic_matrix, load_init, no_weight_decay, resample_patch_kernel,
                               resample_pos_embed, transfer_state)

TINY = dict(depth=1, embed_dim=16, num_heads=2, feature_reuse_dim=4, feature_reuse_hidden=8)


def fresh(seed=0, **ov):
    torch.manual_seed(seed)
    spec = dvt_core.get_spec("dvt_fashion_mnist", **{**TINY, **ov})
    return spec, model_state(DVT(spec))


@pytest.mark.parametrize("old,new", [(2, 4), (4, 7), (7, 10), (10, 7), (14, 4), (3, 3)])
def test_bicubic_matrix_is_torch_bicubic(old, new):
    x = np.random.default_rng(old * new).standard_normal((old, old))
    want = F.interpolate(torch.from_numpy(x)[None, None], size=(new, new), mode="bicubic",
                         align_corners=False)[0, 0].numpy()
    r = bicubic_matrix(old, new)
    np.testing.assert_allclose(r @ x @ r.T, want, atol=1e-10)


def test_pos_embed_resample_keeps_class_token_and_resizes_the_grid():
    rng = np.random.default_rng(0)
    pos = rng.standard_normal((1, 1 + 16, 8)).astype(np.float32)
    out = resample_pos_embed(pos, 7)
    assert out.shape == (1, 50, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], pos[0, 0])
    grid = torch.from_numpy(pos[0, 1:].reshape(4, 4, 8)).permute(2, 0, 1)[None].double()
    want = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(49, 8)
    np.testing.assert_allclose(out[0, 1:], want.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="square grid"):
        resample_pos_embed(pos[:, :12], 7)


@pytest.mark.parametrize("old,new", [(4, 7), (7, 14), (2, 5)])
def test_patch_kernel_resize_keeps_every_patch_response(old, new):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 2, old, old)).astype(np.float32)
    w_new = resample_patch_kernel(w, new)
    assert w_new.shape == (6, 2, new, new)
    patches = torch.from_numpy(rng.standard_normal((5, 2, old, old)))
    resized = F.interpolate(patches, size=(new, new), mode="bicubic", align_corners=False).numpy()
    before = np.einsum("dcij,ncij->nd", w.astype(np.float64), patches.numpy())
    after = np.einsum("dcij,ncij->nd", w_new.astype(np.float64), resized)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)


def test_input_channel_adaptation_keeps_the_response_of_grey_images():
    rng = np.random.default_rng(2)
    rgb = rng.standard_normal((4, 3, 5, 5))
    grey = rng.standard_normal((1, 5, 5))
    as_rgb = np.repeat(grey, 3, axis=0)
    np.testing.assert_allclose(np.einsum("dcij,cij->d", adapt_in_chans(rgb, 1), grey),
                               np.einsum("dcij,cij->d", rgb, as_rgb), atol=1e-10)
    one = rng.standard_normal((4, 1, 5, 5))
    np.testing.assert_allclose(np.einsum("dcij,cij->d", adapt_in_chans(one, 3), as_rgb),
                               np.einsum("dcij,cij->d", one, grey), atol=1e-10)


def test_new_class_count_reinitialises_only_the_heads():
    spec10, src = fresh(seed=1)
    spec5, target = fresh(seed=2, num_classes=5)
    state, report = transfer_state(src, target, spec5, "src.safetensors")
    heads = {k for k in target if ".head." in k}
    assert len(heads) == 2 * spec5.num_exits
    for k in target:
        want = target[k] if k in heads else src[k]
        np.testing.assert_array_equal(state[k], want, err_msg=k)
    assert sorted(r.split()[0] for r in report.reinitialised) == sorted(heads)
    assert all("10 -> 5 classes" in r for r in report.reinitialised)
    assert report.resampled == [] and len(report.loaded) == len(target) - len(heads)
    meta = report.to_meta()
    assert meta["file"] == "src.safetensors" and meta["reinitialised"] == report.reinitialised


def test_new_grid_resamples_position_embedding_and_patch_kernel():
    _, src = fresh(seed=1)
    spec, target = fresh(seed=2, grids=(2, 4, 14))  # last stage: 2-pixel patches, 14x14 tokens
    state, report = transfer_state(src, target, spec)
    assert sorted(r.split()[0] for r in report.resampled) == ["stages.2.pos_embed", "stages.2.tokenizer.proj.weight"]
    assert state["stages.2.pos_embed"].shape == target["stages.2.pos_embed"].shape == (1, 197, 16)
    np.testing.assert_allclose(state["stages.2.pos_embed"], resample_pos_embed(src["stages.2.pos_embed"], 14))
    np.testing.assert_allclose(state["stages.2.tokenizer.proj.weight"],
                               resample_patch_kernel(src["stages.2.tokenizer.proj.weight"], 2))
    np.testing.assert_array_equal(state["stages.0.pos_embed"], src["stages.0.pos_embed"])
    # the state loads strictly into the target architecture
    model = DVT(spec)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})


def test_anything_else_is_refused_with_the_three_lists():
    _, src = fresh(seed=1)
    spec, target = fresh(embed_dim=24, num_heads=2)
    with pytest.raises(CheckpointError, match="does not fit") as err:
        transfer_state(src, target, spec)
    assert err.value.mismatched and not err.value.missing and not err.value.unexpected
    assert any(m.startswith("stages.0.blocks.0.attn.qkv.weight") for m in err.value.mismatched)
    static = dvt_core.get_spec("static_fashion_mnist_7x7", **TINY)
    torch.manual_seed(0)
    one_stage = model_state(DVT(static))
    spec3, target3 = fresh()
    with pytest.raises(CheckpointError) as err:
        transfer_state(one_stage, target3, spec3)
    assert any(k.startswith("stages.1.") for k in err.value.missing)
    extra = dict(src, **{"stages.9.head.bias": np.zeros(10, np.float32)})
    with pytest.raises(CheckpointError) as err:
        transfer_state(extra, target3, spec3)
    assert err.value.unexpected == ["stages.9.head.bias"]


def test_load_init_reads_a_checkpoint_file(tmp_path):
    spec10, src = fresh(seed=1)
    path = tmp_path / "src.safetensors"
    write_checkpoint(path, src, {"arch": spec10.name, "spec": spec10.to_dict()})
    spec5, target = fresh(num_classes=5)
    state, report = load_init(path, spec5, target)
    np.testing.assert_array_equal(state["stages.1.blocks.0.attn.qkv.weight"], src["stages.1.blocks.0.attn.qkv.weight"])
    assert report.source == str(path) and len(report.reinitialised) == 6


def test_optimizer_groups_hold_every_stage_without_decay_on_norms_biases_and_embeddings():
    spec = dvt_core.get_spec("dvt_fashion_mnist", **TINY)
    model = DVT(spec)
    groups = optimizer_groups(model, 0.05)
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [[by_id[id(p)] for p in g["params"]] for g in groups]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(names[0] + names[1]) == sorted(trainable), "each trainable parameter in exactly one group"
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    for k in range(spec.num_exits):  # every stage trains, in both groups
        assert any(n.startswith(f"stages.{k}.") for n in names[0]) and any(n.startswith(f"stages.{k}.") for n in names[1])
    no_decay = set(names[1])
    for k in range(spec.num_exits):
        assert {f"stages.{k}.cls_token", f"stages.{k}.pos_embed", f"stages.{k}.norm.weight",
                f"stages.{k}.head.bias"} <= no_decay
        assert f"stages.{k}.head.weight" in names[0]
    assert "stages.1.blocks.0.attn.qkv.weight" in names[0]
    assert no_weight_decay("stages.0.tokenizer.proj.bias", 1) and not no_weight_decay("x.weight", 2)
