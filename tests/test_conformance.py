"""Conformance with the official DVT release.

* The two released models with fixtures (../shared/conformance): an official-layout ``.pth.tar`` built
  with the README's weight rule loads through ``dvt_core.build`` and reproduces every exit's logits;
  the test-only reference (tests/reference_official.py) reproduces them too, which validates it.
* Models without fixtures (T2T-ViT-14, the reuse ablations, the two-exit ViT, other grids): our
  cascade against that reference, fed the same official-layout checkpoint.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dvt_core
import reference_official as R
from official import (assert_exits_close, conformance_dir, official_keys, official_state_from_shapes,
                      official_weight, write_official_release)

pytestmark = pytest.mark.conformance

RELEASES = ("dvt_t2t_vit_12", "dvt_deit_small")
ATOL = 1e-4

RELEASE_META = {
    "flops": [0.52, 1.33, 3.41],
    "anytime_classification": [70.3, 76.1, 78.9],
    "dynamic_threshold": torch.arange(59 * 3, dtype=torch.float32).reshape(59, 3) / 177,
    "budgeted_batch_classification": [[0.6, 1.2, 2.4], [71.0, 76.5, 78.8]],
}


@pytest.fixture(scope="module", params=RELEASES)
def release(request, tmp_path_factory):
    """The fixture images and logits, the official state dict and a ``.pth.tar`` holding it."""
    name = request.param
    data = np.load(conformance_dir() / f"official_{name}.npz")
    state = official_state_from_shapes(official_keys(name))
    path = write_official_release(tmp_path_factory.mktemp(name) / f"{name}.pth.tar", state, RELEASE_META)
    model = dvt_core.build(name, weights=path).eval()
    return SimpleNamespace(name=name, state=state, path=path, model=model,
                           images=torch.from_numpy(data["images"]), logits=data["logits"])


@pytest.mark.parametrize("name", RELEASES)
def test_official_shapes_match_release_layout(name):
    """official_shapes rebuilds the released key list (names, order and shapes) from the spec alone."""
    ours = R.official_shapes(dvt_core.get_spec(name))
    released = [(k, tuple(s)) for k, s in official_keys(name)]
    assert [k for k, _ in ours] == [k for k, _ in released]
    assert ours == released


def test_release_reproduced(release):
    assert len(release.model.stages) == 3
    with torch.no_grad():
        out = release.model(release.images)
    assert_exits_close(out, release.logits, ATOL, f"{release.name} (dvt_core.build) vs the official logits")


def test_reference_reproduces_release(release):
    out = R.official_forward(release.state, dvt_core.get_spec(release.name), release.images)
    assert_exits_close(out, release.logits, ATOL, f"{release.name} (tests reference) vs the official logits")


def test_release_metadata_kept(release):
    meta = release.model.checkpoint_meta
    assert meta["flops"] == pytest.approx(RELEASE_META["flops"])
    assert meta["anytime_classification"] == pytest.approx(RELEASE_META["anytime_classification"])
    assert meta["budgeted_batch_classification"] == RELEASE_META["budgeted_batch_classification"]
    np.testing.assert_allclose(np.asarray(meta["dynamic_threshold"]), RELEASE_META["dynamic_threshold"].numpy())


# ---- variants without fixtures: our cascade vs the reference, same official-layout checkpoint ----------

def _images(spec, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, spec.in_chans, spec.img_size, spec.img_size, generator=g)


def _check_against_reference(spec, tmp_path, *build_args, **overrides):
    """Write ``spec``'s official-layout release, load it with ``build(*build_args, **overrides)``, compare."""
    state = R.official_state(spec, official_weight)
    path = write_official_release(tmp_path / "variant.pth.tar", state)
    model = dvt_core.build(*(build_args or (spec,)), weights=path, **overrides).eval()
    assert model.spec == spec
    images = _images(spec)
    with torch.no_grad():
        ours = model(images)
    assert len(ours) == spec.num_exits
    assert_exits_close(ours, R.official_forward(state, spec, images), ATOL,
                       f"{spec.name} {overrides or ''} grids {spec.grids}")


VARIANTS = [
    pytest.param("dvt_t2t_vit_14", {}, marks=pytest.mark.slow, id="t2t_vit_14"),
    pytest.param("dvt_t2t_vit_12", {"relation_reuse": False}, id="t2t_vit_12-feature_reuse_only"),
    pytest.param("dvt_t2t_vit_12", {"feature_reuse": False}, id="t2t_vit_12-relation_reuse_only"),
    pytest.param("dvt_t2t_vit_12", {"feature_reuse": False, "relation_reuse": False}, id="t2t_vit_12-no_reuse"),
]


@pytest.mark.parametrize("name,overrides", VARIANTS)
def test_full_size_variant_matches_reference(name, overrides, tmp_path):
    _check_against_reference(dvt_core.get_spec(name, **overrides), tmp_path, name, **overrides)


SMALL = [
    # two exits, 7x7 then 14x14 tokens (one resize, 7 -> 14)
    pytest.param("dvt_vit_base", dict(embed_dim=64, depth=2, num_heads=2), id="vit_base-two_exits"),
    # grids the official code never used: intermediate sizes 3 -> 6 -> 5 and 5 -> 10 -> 8
    pytest.param("dvt_deit_tiny", dict(embed_dim=48, depth=2, num_heads=2, img_size=64, grids=(3, 5, 8),
                                       num_classes=10), id="deit-grids_3_5_8"),
    pytest.param("dvt_t2t_vit_7", dict(embed_dim=32, depth=2, num_heads=2, img_size=64, grids=(2, 3, 4),
                                       token_dim=16, num_classes=10), id="t2t-grids_2_3_4"),
]


@pytest.mark.parametrize("name,overrides", SMALL)
def test_small_variant_matches_reference(name, overrides, tmp_path):
    _check_against_reference(dvt_core.get_spec(name, **overrides), tmp_path, name, **overrides)


def test_transformer_tokens_to_token_matches_reference(tmp_path):
    """T2T-ViT-t's softmax token modules (Token_transformer keys) load and match too."""
    base = dvt_core.get_spec("dvt_t2t_vit_7", embed_dim=32, depth=1, num_heads=2, img_size=32,
                             grids=(2, 3, 4), token_dim=16, num_classes=7)
    spec = dataclasses.replace(base, stages=tuple(
        dataclasses.replace(st, t2t=dataclasses.replace(st.t2t, token_type="transformer")) for st in base.stages))
    _check_against_reference(spec, tmp_path)


def test_data_parallel_prefix_accepted(tmp_path):
    """A release saved from nn.DataParallel (every key under ``module.``) loads the same way."""
    overrides = dict(embed_dim=32, depth=1, num_heads=2, img_size=32, grids=(2, 3, 4), token_dim=16, num_classes=5)
    spec = dvt_core.get_spec("dvt_t2t_vit_12", **overrides)
    state = R.official_state(spec, official_weight)
    plain = write_official_release(tmp_path / "plain.pth.tar", state)
    wrapped = write_official_release(tmp_path / "wrapped.pth.tar", {f"module.{k}": v for k, v in state.items()})
    images = _images(spec)
    with torch.no_grad():
        a = dvt_core.build("dvt_t2t_vit_12", weights=plain, **overrides).eval()(images)
        b = dvt_core.build("dvt_t2t_vit_12", weights=wrapped, **overrides).eval()(images)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert_exits_close(a, R.official_forward(state, spec, images), ATOL, "module.-prefixed release")


def test_release_without_relation_reuse_does_not_load_into_full_model(tmp_path):
    """An ablation checkpoint (no relation_reuse_conv) is refused by the default spec, naming what is missing."""
    overrides = dict(embed_dim=32, depth=1, num_heads=2, img_size=32, grids=(2, 3, 4), token_dim=16, num_classes=5)
    spec = dvt_core.get_spec("dvt_t2t_vit_12", relation_reuse=False, **overrides)
    path = write_official_release(tmp_path / "ablation.pth.tar", R.official_state(spec, official_weight))
    with pytest.raises(dvt_core.CheckpointError, match="relation_reuse") as info:
        dvt_core.build("dvt_t2t_vit_12", weights=path, **overrides)
    assert info.value.missing and not info.value.unexpected and not info.value.mismatched
    assert all(".relation_reuse." in k for k in info.value.missing)
    dvt_core.build("dvt_t2t_vit_12", weights=path, relation_reuse=False, **overrides)  # the right spec loads
