"""Checkpoints of the authors' MindSpore DVT code: import, numerics, variants and conversion.

* The two fixtures of ../shared/conformance (``official_ms_dvt_deit_small*``): a ``.ckpt`` written with
  ``mindspore.save_checkpoint`` under that code's names, optimizer state included, loads through
  ``dvt_core.build("dvt_ms_deit_small", weights=path)`` in both backends and reproduces both exits.
* Variants without fixtures (the two one-reuse ablations, ViT-B width): same kind of ``.ckpt``, both
  backends against the test-only reference of that code (tests/reference_ms_official.py), which the
  fixtures validate.
* ``convert``: that layout -> torch / safetensors / this project's MindSpore layout, and back to that
  layout bit-exactly.
* The spec switches themselves (GELU flavour, the discarded feature-reuse LayerNorm).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="checkpoints of the authors' MindSpore code are MindSpore .ckpt files")
torch = pytest.importorskip("torch")

import dvt_core  # noqa: E402
import reference_ms_official as R  # noqa: E402
from dvt_core import CheckpointError  # noqa: E402
from dvt_core.checkpoint.files import read_checkpoint  # noqa: E402
from dvt_core.checkpoint.convert import convert  # noqa: E402
from dvt_core.checkpoint.naming import canonical_to_ms_official, ms_official_to_canonical  # noqa: E402
from helpers import cli  # noqa: E402
from official import assert_exits_close, conformance_dir  # noqa: E402

pytestmark = [pytest.mark.mindspore, pytest.mark.conformance]

NAME = "dvt_ms_deit_small"
ATOL = 1e-4
FIXTURES = {
    "official_ms_dvt_deit_small": {},
    "official_ms_dvt_deit_small_no_reuse": {"feature_reuse": False, "relation_reuse": False},
}
BACKENDS = ("torch", "mindspore")


def save_official_ckpt(path, shapes, training_state: bool = True):
    """A .ckpt as that code's training writes it: its parameters in its order, then the optimizer's."""
    state = R.ms_official_state(shapes)
    items = [{"name": k, "data": ms.Tensor(v)} for k, v in state.items()]
    if training_state:
        items += [{"name": k, "data": ms.Tensor(v)} for k, v in R.iter_training_state(shapes)]
    ms.save_checkpoint(items, str(path))
    return path, state


def forward(model, backend, images):
    if backend == "torch":
        with torch.no_grad():
            return [o.numpy() for o in model.eval()(torch.from_numpy(images))]
    model.set_train(False)
    return [o.asnumpy() for o in model(ms.Tensor(images))]


def keys_doc(fixture):
    return json.loads((conformance_dir() / f"{fixture}.keys.json").read_text())


@pytest.fixture(scope="module", params=list(FIXTURES))
def release(request, tmp_path_factory):
    fixture = request.param
    shapes = R.shapes_from_keys_json(keys_doc(fixture))
    path, state = save_official_ckpt(tmp_path_factory.mktemp(fixture) / f"{fixture}.ckpt", shapes)
    data = np.load(conformance_dir() / f"{fixture}.npz")
    return dict(fixture=fixture, overrides=FIXTURES[fixture], shapes=shapes, path=path, state=state,
                images=data["images"], logits=data["logits"])


# ---- layout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_layout_matches_release(fixture):
    """Our canonical state, renamed for that code, has exactly its names, order and shapes (and back)."""
    released = R.shapes_from_keys_json(keys_doc(fixture))
    spec = dvt_core.get_spec(NAME, **FIXTURES[fixture])
    assert R.ms_official_shapes(spec) == released  # validates the reference's layout
    canonical = dvt_core.build(spec).state_dict()
    ours = canonical_to_ms_official({k: v.numpy() for k, v in canonical.items()})
    assert [(k, tuple(v.shape)) for k, v in ours.items()] == released
    back = ms_official_to_canonical(ours)
    assert set(back) == set(canonical)
    for k, v in canonical.items():
        assert np.array_equal(back[k], v.numpy()), k


def test_zoo_entry():
    spec = dvt_core.get_spec(NAME)
    assert spec.grids == (7, 14) and spec.num_classes == 1001 and spec.gelu == "tanh"
    assert [(s.patch_kernel, s.patch_padding, s.ln_eps) for s in spec.stages] == [(32, 0, 1e-7), (16, 0, 1e-7)]
    assert spec.feature_reuse and spec.relation_reuse and spec.feature_reuse_norm == "discard"
    wide = dvt_core.get_spec(NAME, embed_dim=768, num_heads=12)
    assert R.ms_official_shapes(wide) == [(k, tuple(v.shape)) for k, v in canonical_to_ms_official(
        {k: v.numpy() for k, v in dvt_core.build(wide).state_dict().items()}).items()]


# ---- the fixtures, in both backends ------------------------------------------------------------------------

def test_reference_reproduces_release(release):
    spec = dvt_core.get_spec(NAME, **release["overrides"])
    out = R.ms_official_forward(release["state"], spec, torch.from_numpy(release["images"]))
    assert_exits_close(out, release["logits"], ATOL, f"{release['fixture']} (tests reference)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_release_reproduced(release, backend):
    model = dvt_core.build(NAME, backend=backend, weights=release["path"], **release["overrides"])
    assert_exits_close(forward(model, backend, release["images"]), release["logits"], ATOL,
                       f"{release['fixture']} ({backend})")
    dropped = model.checkpoint_meta["dropped_training_state"]
    assert len(dropped) == 2 * len(release["shapes"]) + 4
    assert {"beta1_power", "beta2_power", "global_step", "learning_rate"} <= set(dropped)
    assert f"adam_m.{release['shapes'][0][0]}" in dropped and f"adam_v.{release['shapes'][-1][0]}" in dropped
    assert model.checkpoint_meta["source_layout"] == "mindspore-official"


def test_wrong_ablation_is_refused_by_name(release, tmp_path):
    """The full-reuse checkpoint does not load into the no-reuse spec (or the reverse), naming the keys."""
    other = {} if release["overrides"] else FIXTURES["official_ms_dvt_deit_small_no_reuse"]
    with pytest.raises(CheckpointError, match="feature_resuse_mlp|feature_reuse") as info:
        dvt_core.build(NAME, weights=release["path"], **other)
    assert info.value.missing or info.value.unexpected


# ---- variants without fixtures: both backends against the reference ----------------------------------------

# Full widths and grids; two blocks keep them quick (the import reads depth from the spec like any width).
VARIANTS = [
    pytest.param({"relation_reuse": False, "depth": 2}, id="feature_reuse_only-depth2"),
    pytest.param({"feature_reuse": False, "depth": 2}, id="relation_reuse_only-depth2"),
    pytest.param({"embed_dim": 768, "num_heads": 12, "depth": 2}, id="vit_b_width-depth2"),
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_variant_loads_and_matches_reference(overrides, tmp_path):
    spec = dvt_core.get_spec(NAME, **overrides)
    path, state = save_official_ckpt(tmp_path / "variant.ckpt", R.ms_official_shapes(spec))
    images = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    reference = R.ms_official_forward(state, spec, torch.from_numpy(images))
    for backend in BACKENDS:
        model = dvt_core.build(NAME, backend=backend, weights=path, **overrides)
        assert model.spec == spec
        assert_exits_close(forward(model, backend, images), reference, ATOL, f"{overrides} ({backend})")


# ---- conversion ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_release(tmp_path_factory):
    """The full-reuse fixture's model as a .ckpt without training state (what the round trip must give)."""
    shapes = R.shapes_from_keys_json(keys_doc("official_ms_dvt_deit_small"))
    tmp = tmp_path_factory.mktemp("plain")
    path, state = save_official_ckpt(tmp / "model.ckpt", shapes, training_state=False)
    train_path, _ = save_official_ckpt(tmp / "train.ckpt", shapes, training_state=True)
    return dict(path=path, train_path=train_path, state=state, tmp=tmp)


@pytest.mark.convert
def test_round_trip_through_safetensors_is_bit_exact(plain_release):
    tmp = plain_release["tmp"]
    sft = tmp / "model.safetensors"
    convert(plain_release["train_path"], sft, arch=NAME)
    back = tmp / "back.ckpt"
    out = convert(sft, back, to="mindspore-official")
    assert out["format"] == "mindspore-official"
    assert back.read_bytes() == plain_release["path"].read_bytes()  # the same file that code writes
    got = ms.load_checkpoint(str(back))
    assert list(got) == list(plain_release["state"])
    for k, v in plain_release["state"].items():
        assert np.array_equal(got[k].asnumpy(), v), k
    assert read_checkpoint(back).layout == "ms_official"


@pytest.mark.convert
def test_converted_files_give_the_same_logits(plain_release):
    """torch, safetensors and this project's MindSpore layout all hold the same model."""
    tmp = plain_release["tmp"]
    images = np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)
    direct = forward(dvt_core.build(NAME, weights=plain_release["path"]), "torch", images)
    for dst in ("model.pth", "model2.safetensors", "model.project.ckpt"):
        convert(plain_release["path"], tmp / dst, arch=NAME)
        ck = read_checkpoint(tmp / dst)
        assert ck.layout == "canonical" and ck.meta["arch"] == NAME
        model = dvt_core.build(weights=tmp / dst)  # the spec travels in the metadata
        for a, b in zip(forward(model, "torch", images), direct):
            assert np.array_equal(a, b), dst
    # and this project's layout back to that code's, bit-exactly
    convert(tmp / "model.project.ckpt", tmp / "again.ckpt", to="mindspore-official")
    assert (tmp / "again.ckpt").read_bytes() == plain_release["path"].read_bytes()


@pytest.mark.convert
def test_export_refuses_a_model_that_code_does_not_compute(tmp_path):
    spec = dvt_core.get_spec("dvt_deit_small", embed_dim=32, depth=1, num_heads=2)
    src = tmp_path / "deit.safetensors"
    from dvt_core.checkpoint.files import write_checkpoint

    write_checkpoint(src, {k: v.numpy() for k, v in dvt_core.build(spec).state_dict().items()},
                     {"arch": spec.name, "spec": spec.to_dict()})
    with pytest.raises(CheckpointError, match="two exits, not 3.*tanh"):
        convert(src, tmp_path / "out.ckpt", to="mindspore-official")
    assert not (tmp_path / "out.ckpt").exists()


# ---- the spec switches -------------------------------------------------------------------------------------

# two blocks: a block's reused features reach the class token (all the head reads) only through the
# next block's attention
SMALL = dict(img_size=32, grids=(2, 4), depth=2, embed_dim=16, num_heads=2, num_classes=5)


def _small_pair(**overrides):
    spec = dvt_core.get_spec(NAME, **SMALL, **overrides)
    torch.manual_seed(0)
    model = dvt_core.build(spec).eval()
    return model, torch.randn(2, 3, 32, 32)


def test_discarded_feature_reuse_norm_has_no_effect_but_applied_one_does():
    for mode, changes in (("discard", False), ("apply", True)):
        model, x = _small_pair(feature_reuse_norm=mode)
        with torch.no_grad():
            before = model(x)[1]
            norm = model.stages[1].blocks[0].feature_reuse.norm
            norm.weight.mul_(3.0)
            norm.bias.add_(1.0)
            after = model(x)[1]
        assert (not torch.equal(before, after)) == changes, mode


def test_gelu_flavour_reaches_every_mlp():
    model, _ = _small_pair()
    blk = model.stages[1].blocks[0]
    acts = [blk.mlp.act, blk.feature_reuse.act, model.stages[1].relation_reuse.act, model.stages[0].blocks[0].mlp.act]
    assert all(a.approximate == "tanh" for a in acts)
    exact, _ = _small_pair(gelu="exact")
    blk = exact.stages[1].blocks[0]
    assert all(a.approximate == "none" for a in (blk.mlp.act, blk.feature_reuse.act, exact.stages[1].relation_reuse.act))
    with pytest.raises(dvt_core.SpecError, match="gelu"):
        dvt_core.get_spec(NAME, gelu="sigmoid")
    with pytest.raises(dvt_core.SpecError, match="feature_reuse_norm"):
        dvt_core.get_spec(NAME, feature_reuse_norm="skip")


# ---- the command line ------------------------------------------------------------------------------------

@pytest.mark.convert
def test_cli_converts_there_and_back(tmp_path):
    small = dict(SMALL)
    spec = dvt_core.get_spec(NAME, **small)
    src, state = save_official_ckpt(tmp_path / "train.ckpt", R.ms_official_shapes(spec))
    plain, _ = save_official_ckpt(tmp_path / "plain.ckpt", R.ms_official_shapes(spec), training_state=False)

    def dvt(*args):
        return cli(*args, cwd=tmp_path)

    opts = [x for k, v in small.items() for x in ("-O", f"{k}={list(v) if isinstance(v, tuple) else v}")]
    r = dvt("convert", src, tmp_path / "m.safetensors", "--arch", NAME, *opts)
    assert r.returncode == 0, r.stderr
    r = dvt("convert", tmp_path / "m.safetensors", tmp_path / "back.ckpt", "--to", "mindspore-official")
    assert r.returncode == 0, r.stderr
    assert "mindspore-official" in r.stdout
    assert (tmp_path / "back.ckpt").read_bytes() == plain.read_bytes()
    r = dvt("convert", src, tmp_path / "x.ckpt", "--arch", NAME, "--to", "mindspore-official")  # full size: 2 x 12
    assert r.returncode == 2 and "does not match" in r.stderr and "Traceback" not in r.stderr
