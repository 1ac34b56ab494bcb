"""Cross-backend parity: the MindSpore backend against the PyTorch one, through converted checkpoints.

For every zoo model (shrunk by overrides) and, marked ``slow``, full-size DVT-T2T-ViT-12 and DVT-DeiT-S:
the torch model's weights go to ``.safetensors`` with ``write_checkpoint``, are converted to a MindSpore
``.ckpt``, and ``dvt_core.build(name, backend="mindspore", weights=ckpt)`` must then give

* every exit's logits within 1e-4 of torch's (the worst difference is reported, as transformers'
  PT/TF equivalence tests do, and listed in the terminal summary),
* the same argmax at every exit, and the same early-exit decisions (prediction, exit) from
  ``adaptive`` for every image whose confidence is not within 1e-5 of a threshold,
* bit-identical tensors after torch -> MindSpore .ckpt -> torch.

The MindSpore backend also reproduces the official release (../shared/conformance) straight from its
``.pth.tar`` layout (DVT-T2T-ViT-12's in test_export_parity.py, on the model its MindIR export starts
from). Small models get O(1) weights from the conformance README's per-key rule
(tests/official.py), so logits and confidences spread like a trained model's rather than sitting at
chance level as a fresh initialisation's do.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="the MindSpore backend and .ckpt conversion need mindspore")
torch = pytest.importorskip("torch", reason="parity compares against the PyTorch backend")

from dvt_backends.mindspore import RUNTIME as bm  # noqa: E402
from dvt_backends.mindspore import compat  # noqa: E402
from dvt_backends.torch import RUNTIME as bt  # noqa: E402
import dvt_core  # noqa: E402
from dvt_core import CheckpointError, InputError  # noqa: E402
from dvt_core.checkpoint.files import read_checkpoint, write_checkpoint  # noqa: E402
from dvt_core.checkpoint.naming import canonical_to_mindspore  # noqa: E402
from dvt_core.runtime.policy import confidence as confidence_of, softmax  # noqa: E402
from official import (conformance_dir, exit_differences, official_keys, official_state_from_shapes,  # noqa: E402
                      official_weight, write_official_release)

from .conftest import random_images, record_worst, small_overrides  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.mindspore]

ATOL = 1e-4  # logits, per exit
CONF_MARGIN = 1e-5  # images this close to a threshold may legitimately exit differently
MODELS = dvt_core.list_models()
FULL = ("dvt_t2t_vit_12", "dvt_deit_small")
N_SMALL, N_FULL = 16, 4


# ---- building a torch / MindSpore pair through converted checkpoints ----------------------------------

def convert(tm, tmp) -> tuple:
    """torch model -> .safetensors (write_checkpoint) -> MindSpore .ckpt; returns both paths."""
    meta = {"arch": tm.spec.name, "spec": tm.spec.to_dict()}
    sft = write_checkpoint(tmp / "weights.safetensors", bt.model_state(tm), meta)
    ck = read_checkpoint(sft)
    ckpt = write_checkpoint(tmp / "weights.ckpt", ck.state, ck.meta)
    return sft, ckpt


def make_pair(target, tmp, overrides: dict, n_images: int, rule_weights: bool, seed: int = 0):
    """``target``: a zoo name or a CascadeSpec. Torch model (seeded) -> checkpoints -> MindSpore model."""
    torch.manual_seed(seed)
    tm = dvt_core.build(target, backend="torch", **overrides).eval()
    if rule_weights:
        bt.load_state(tm, {k: official_weight(k, v.shape) for k, v in bt.model_state(tm).items()})
    sft, ckpt = convert(tm, tmp)
    mm = dvt_core.build(target, backend="mindspore", weights=ckpt, **overrides)
    mm.set_train(False)
    x = random_images(tm.spec, n_images, seed=seed + 1)
    with torch.no_grad():
        t_out = [o.numpy() for o in tm(torch.from_numpy(x))]
    m_out = [o.asnumpy() for o in mm(ms.Tensor(x))]
    conf = np.stack([confidence_of(softmax(o)[None])[0] for o in t_out])  # (exits, B), torch's
    return SimpleNamespace(name=tm.spec.name, target=target, spec=tm.spec, tm=tm, mm=mm, sft=sft, ckpt=ckpt, x=x,
                           overrides=overrides, t_out=t_out, m_out=m_out, conf=conf)


def token_transformer_spec():
    """The T2T-ViT-t tokens-to-token (softmax attention instead of Performer), which no zoo entry uses."""
    base = dvt_core.get_spec("dvt_t2t_vit_12", **small_overrides("dvt_t2t_vit_12"))
    stages = tuple(dataclasses.replace(s, t2t=dataclasses.replace(s.t2t, token_type="transformer"))
                   for s in base.stages)
    return dataclasses.replace(base, name="dvt_t2t_vit_12_t", stages=stages).validate()


# zoo entries, plus variants that take other code paths: (target, overrides)
CASES = {name: (name, None) for name in MODELS}
CASES.update({
    "token_transformer": (token_transformer_spec, {}),
    "no_relation_reuse": ("dvt_t2t_vit_12", {"relation_reuse": False}),
    "no_feature_reuse": ("dvt_deit_small", {"feature_reuse": False}),
})


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    target, extra = CASES[request.param]
    if callable(target):  # an already small spec
        target, overrides = target(), {}
    else:
        overrides = {**small_overrides(target), **(extra or {})}
    p = make_pair(target, tmp_path_factory.mktemp(request.param), overrides, N_SMALL, rule_weights=True)
    p.label = request.param if request.param == p.name else f"{request.param} ({p.name})"
    return p


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) for n in FULL])
def full_pair(request, tmp_path_factory):
    name = request.param
    return make_pair(name, tmp_path_factory.mktemp(name), {}, N_FULL, rule_weights=True)


# ---- checks shared by the small and the full-size models -----------------------------------------------

def check_logits(p, label: str) -> None:
    diffs = exit_differences(p.m_out, p.t_out)
    record_worst(label, diffs)
    worst = int(np.argmax(diffs))
    assert diffs[worst] <= ATOL, (f"{label}: MindSpore vs torch, max|difference| {diffs[worst]:.3e} at exit "
                                  f"{worst + 1} exceeds {ATOL:g} (per exit: {', '.join(f'{d:.2e}' for d in diffs)})")


def check_argmax(p) -> None:
    for i, (a, b) in enumerate(zip(p.t_out, p.m_out)):
        top2 = np.sort(a, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > CONF_MARGIN
        assert clear.sum() >= len(a) - 1, f"exit {i + 1}: too many near-ties to compare"
        np.testing.assert_array_equal(a.argmax(1)[clear], b.argmax(1)[clear], err_msg=f"argmax at exit {i + 1}")


def split_thresholds(conf: np.ndarray) -> np.ndarray:
    """Per exit but the last, midway between the two middle confidences: images split across exits."""
    t = []
    for c in conf[:-1]:
        s = np.sort(c)
        mid = len(s) // 2
        t.append((s[max(mid - 1, 0)] + s[mid]) / 2)
    return np.asarray(t, np.float32)


def clear_of(conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Images whose confidence is further than CONF_MARGIN from every threshold they may meet."""
    if len(thresholds) == 0:
        return np.ones(conf.shape[1], bool)
    return (np.abs(conf[:len(thresholds)] - thresholds[:, None]) > CONF_MARGIN).all(axis=0)


def run_both(p, x: np.ndarray, thresholds):
    with torch.no_grad():
        rt = p.tm.adaptive(torch.from_numpy(x), thresholds)
    rm = p.mm.adaptive(ms.Tensor(x), thresholds)
    return rt, rm


def check_adaptive(p, variants: bool = True) -> None:
    """Thresholds that split the batch; with ``variants`` also batches of one and all-first / all-last."""
    thresholds = split_thresholds(p.conf)
    rt, rm = run_both(p, p.x, thresholds)
    ok = clear_of(p.conf, thresholds)
    assert ok.sum() >= len(ok) - 2, "too many images sit on a threshold to compare"
    if p.spec.num_exits > 1:
        assert (rt.exit_counts > 0).sum() >= 2, f"thresholds {thresholds} did not split the batch: {rt.exit_counts}"
    np.testing.assert_array_equal(rm.exit_index[ok], rt.exit_index[ok], err_msg="exit taken")
    np.testing.assert_array_equal(rm.prediction[ok], rt.prediction[ok], err_msg="prediction")
    np.testing.assert_array_equal(rm.macs[ok], rt.macs[ok], err_msg="MACs charged")
    np.testing.assert_allclose(rm.confidence[ok], rt.confidence[ok], rtol=0, atol=CONF_MARGIN)
    np.testing.assert_allclose(rm.logits[ok], rt.logits[ok], rtol=0, atol=ATOL)
    # early exit equals the full forward pass read at the exit taken
    full = np.stack(p.m_out)[rm.exit_index, np.arange(len(p.x))]
    np.testing.assert_allclose(rm.logits, full, rtol=0, atol=ATOL)

    if not variants:
        return
    # a batch of one, for the image that goes furthest and for the first image
    for i in sorted({int(np.argmax(rt.exit_index)), 0}):
        if not ok[i]:
            continue
        one_t, one_m = run_both(p, p.x[i:i + 1], thresholds)
        assert (int(one_m.exit_index[0]), int(one_m.prediction[0])) == (int(rt.exit_index[i]), int(rt.prediction[i]))
        assert (int(one_t.exit_index[0]), int(one_t.prediction[0])) == (int(rt.exit_index[i]), int(rt.prediction[i]))

    # everything leaves at the first exit (max softmax is never below 0) ...
    n = p.spec.num_exits
    rt0, rm0 = run_both(p, p.x, np.zeros(n - 1, np.float32))
    for r in (rt0, rm0):
        assert r.exit_index.tolist() == [0] * len(p.x)
        assert r.exit_counts.tolist() == [len(p.x)] + [0] * (n - 1)
    clear0 = _clear_argmax(p.t_out[0])
    np.testing.assert_array_equal(rm0.prediction[clear0], rt0.prediction[clear0])
    # ... or at the last (no confidence reaches 2)
    rtl, rml = run_both(p, p.x, np.full(n - 1, 2.0, np.float32))
    for r in (rtl, rml):
        assert r.exit_index.tolist() == [n - 1] * len(p.x)
    clear_l = _clear_argmax(p.t_out[-1])
    np.testing.assert_array_equal(rml.prediction[clear_l], rtl.prediction[clear_l])


def _clear_argmax(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > CONF_MARGIN


def check_round_trip(p) -> None:
    """torch -> MindSpore .ckpt -> torch is bit-exact; the MindSpore model holds exactly those bits too."""
    ref = bt.model_state(p.tm)
    back = dvt_core.build(p.target, backend="torch", weights=p.ckpt, **p.overrides)
    assert back.spec == p.spec
    again = back.state_dict()
    assert set(again) == set(ref)
    for k, v in ref.items():
        assert again[k].dtype == torch.float32 and torch.equal(again[k], torch.from_numpy(v)), k
    ms_state = bm.model_state(p.mm)
    assert set(ms_state) == set(ref)
    for k, v in ref.items():
        assert ms_state[k].dtype == v.dtype and np.array_equal(ms_state[k], v), k
    assert p.mm.checkpoint_meta["arch"] == p.spec.name
    assert p.mm.checkpoint_meta["spec"] == p.spec.to_dict()


# ---- small models: every zoo entry ------------------------------------------------------------------

def test_parameter_names_correspond(pair):
    """The Cell's parameter names are exactly the torch state-dict keys renamed by dvt_core.checkpoint.naming."""
    t_shapes = {canonical_to_mindspore(k): tuple(v.shape) for k, v in pair.tm.state_dict().items()}
    m_shapes = {n: tuple(p.shape) for n, p in pair.mm.parameters_and_names()}
    assert set(m_shapes) == set(t_shapes), (sorted(set(m_shapes) ^ set(t_shapes)))
    assert m_shapes == t_shapes
    norms = [n for n in m_shapes if n.rsplit(".", 2)[-2].startswith("norm")]
    assert norms and all(n.rsplit(".", 1)[-1] in (compat.LN_WEIGHT, compat.LN_BIAS) for n in norms)
    t_frozen = {canonical_to_mindspore(n) for n, p in pair.tm.named_parameters() if not p.requires_grad}
    m_frozen = {n for n, p in pair.mm.parameters_and_names() if not p.requires_grad}
    assert m_frozen == t_frozen


def test_logits_match(pair):
    check_logits(pair, pair.label)


def test_argmax_match(pair):
    check_argmax(pair)


def test_adaptive_match(pair):
    check_adaptive(pair)


@pytest.mark.convert
def test_round_trip_bit_exact(pair):
    check_round_trip(pair)


# ---- full size -----------------------------------------------------------------------------------------

def test_full_size(full_pair):
    check_logits(full_pair, f"{full_pair.name} (224 px)")
    check_argmax(full_pair)
    check_adaptive(full_pair, variants=False)  # the variants run on every small model
    check_round_trip(full_pair)


# ---- the official release, straight from its layout (DVT-T2T-ViT-12's: test_export_parity.py's
# test_mindir_full_size_official_weights, on the model its MindIR export starts from) -------------------------

@pytest.mark.slow
@pytest.mark.conformance
def test_official_release_reproduced(tmp_path):
    name = "dvt_deit_small"
    data = np.load(conformance_dir() / f"official_{name}.npz")
    path = write_official_release(tmp_path / f"{name}.pth.tar", official_state_from_shapes(official_keys(name)))
    model = dvt_core.build(name, backend="mindspore", weights=path)
    model.set_train(False)
    assert model.checkpoint_meta["flops"] == pytest.approx([0.5, 1.4, 3.4])
    out = [o.asnumpy() for o in model(ms.Tensor(data["images"]))]
    diffs = exit_differences(out, data["logits"])
    record_worst(f"official {name}", diffs)
    assert max(diffs) <= ATOL, f"{name}: MindSpore vs the official logits, per exit {diffs}"


# ---- strictness and errors of the MindSpore backend ------------------------------------------------------

@pytest.fixture(scope="module")
def small_ms():
    name = "dvt_t2t_vit_12"
    return dvt_core.build(name, backend="mindspore", **small_overrides(name))


def test_strict_load_lists_problems(small_ms):
    state = bm.model_state(small_ms)
    first = "stages.0.blocks.0.norm1.weight"  # a LayerNorm: reported under its canonical (torch) name
    del state[first]
    state["stages.0.blocks.0.extra"] = np.zeros(3, np.float32)
    state["stages.1.head.bias"] = np.zeros(7, np.float32)
    with pytest.raises(CheckpointError) as info:
        bm.load_state(small_ms, state, source="my.ckpt")
    err = info.value
    assert err.missing == [first]
    assert err.unexpected == ["stages.0.blocks.0.extra"]
    assert err.mismatched == ["stages.1.head.bias (7,) vs (10,)"]
    assert "my.ckpt" in str(err) and "1 missing" in str(err) and "1 mismatched" in str(err)


def test_ckpt_of_another_model_is_refused(small_ms, tmp_path):
    path = write_checkpoint(tmp_path / "m.ckpt", bm.model_state(small_ms),
                            {"arch": small_ms.spec.name, "spec": small_ms.spec.to_dict()})
    assert path.read_bytes()[:1] == b"\x0a"
    with pytest.raises(CheckpointError, match="dvt_t2t_vit_12"):
        dvt_core.build("dvt_deit_tiny", backend="mindspore", weights=path)
    with pytest.raises(FileExistsError):
        write_checkpoint(path, bm.model_state(small_ms))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]  # no temporary left behind


def test_bad_images_are_named(small_ms):
    s = small_ms.spec
    with pytest.raises(InputError, match="mindspore.Tensor"):
        small_ms(np.zeros((1, s.in_chans, s.img_size, s.img_size), np.float32))
    with pytest.raises(InputError, match="channel"):
        small_ms(ms.Tensor(np.zeros((1, s.in_chans + 1, s.img_size, s.img_size), np.float32)))
    with pytest.raises(InputError, match="rank"):
        small_ms.adaptive(ms.Tensor(np.zeros((s.in_chans, s.img_size, s.img_size), np.float32)), [0.5, 0.5])


def test_graph_mode_matches_pynative(small_ms):
    """``DVT.compiled()`` (ms.jit graph mode) computes exactly what PyNative does, and checks its input."""
    x = ms.Tensor(random_images(small_ms.spec, 3))
    small_ms.set_train(False)
    run = small_ms.compiled()
    for a, b in zip(run(x), small_ms(x)):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    with pytest.raises(InputError):
        run(ms.Tensor(np.zeros((1, 1, 8, 8), np.float32)))


def test_numpy_helpers_match_forward(small_ms):
    x = random_images(small_ms.spec, 3)
    out = bm.forward_numpy(small_ms, x)
    direct = [o.asnumpy() for o in small_ms(ms.Tensor(x))]
    for a, b in zip(out, direct):
        np.testing.assert_array_equal(a, b)
    r = bm.adaptive_numpy(small_ms, x, [2.0, 2.0])
    assert r.exit_index.tolist() == [2, 2, 2]
