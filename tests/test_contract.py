"""The runtime contract (``dvt_core.runtime.contract``): every registered runtime implements its layer's
primitives with the written signatures and none overrides what is derived from them; the frameworks behave
alike where dvt_core says they must (mode after build, early exit, file round trip, initialisation and
stochastic-depth numbers read from dvt_core)."""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest

import dvt_core
from dvt_core.model.recipe import INIT_STD, TRUNC_BOUND, drop_path_rates
from dvt_core.runtime import contract

from helpers import SMALL, SMALL_T2T, random_images, spread_thresholds

BACKENDS = [pytest.param("torch"), pytest.param("mindspore", marks=pytest.mark.mindspore)]
RUNTIMES = BACKENDS + [pytest.param("onnx", marks=pytest.mark.export),
                       pytest.param("mindir", marks=[pytest.mark.export, pytest.mark.mindspore]),
                       pytest.param("openvino", marks=pytest.mark.export),
                       pytest.param("pt2", marks=pytest.mark.export)]
# what the contract derives from the primitives: written once in Runtime, never in a runtime
DERIVED = ("check_precision", "images_in", "forward_numpy", "adaptive", "adaptive_numpy")


def _module(name):
    return contract.get_backend(name)


def _params(fn, drop_self: bool = True):
    ps = list(inspect.signature(fn).parameters.values())[1 if drop_self else 0:]
    return [(p.name, p.kind, p.default) for p in ps]


def _primitives(layer) -> set:
    return {n for cls in layer.__mro__ for n in getattr(cls, "__abstractmethods__", ())}


# ---- the written contract ---------------------------------------------------------------------------------

def test_every_primitive_and_derived_operation_is_documented():
    assert _primitives(contract.Framework) >= {"build_model", "model_state", "load_state", "read_file", "write_file",
                                              "device_for", "to_device", "to_tensor", "to_numpy", "run_stage",
                                              "select", "join", "inference"}
    assert "open" in _primitives(contract.GraphRuntime) and "build_model" not in _primitives(contract.GraphRuntime)
    for layer in (contract.Runtime, contract.Framework, contract.GraphRuntime):
        for name in _primitives(layer) | set(DERIVED) | {"set_precision"}:
            assert (getattr(layer, name).__doc__ or "").strip(), f"{layer.__name__}.{name} has no docstring"


@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_implements_its_layer_with_the_written_signatures(name):
    rt = _module(name)
    layer = contract.Framework if contract.RUNTIMES[name][2] == "spec" else contract.GraphRuntime
    assert isinstance(rt, layer) and rt.name == name
    if layer is contract.GraphRuntime:  # no refusing stubs: a graph runtime has no framework members at all
        assert not isinstance(rt, contract.Framework) and not hasattr(rt, "build_model")
    for member in _primitives(layer) | {"set_precision"}:
        own = getattr(rt, member)  # bound (or a framework function serving as it): no self to drop
        assert _params(own, drop_self=False) == _params(getattr(layer, member)), \
            f"{name}: {member}{inspect.signature(own)} differs from the contract"
    if layer is contract.Framework:  # the framework's trainer is its package's train.make_trainer
        assert getattr(type(rt), "trainer") is contract.Framework.trainer
    for member in DERIVED:  # derived operations come from the base, unchanged
        assert getattr(type(rt), member) is getattr(contract.Runtime, member), f"{name} overrides {member}"


def test_a_package_without_a_runtime_is_refused(monkeypatch):
    import dvt_backends.torch as package

    monkeypatch.setattr(package, "RUNTIME", object())
    with pytest.raises(dvt_core.InputError, match="does not fulfil the runtime contract"):
        contract.get_backend("torch")


def test_an_unoffered_precision_is_named():
    with pytest.raises(dvt_core.InputError, match="runs fp32, not 'int4'"):
        _module("onnx").check_precision("int4")


# ---- finding the backend of a model --------------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
def test_backend_of_reads_the_model_not_its_module_name(name):
    mod = _module(name)
    model = dvt_core.build("dvt_deit_tiny", backend=name, **SMALL)
    assert model.backend_name == name and contract.backend_of(model) is mod

    class Wrapped:  # defined in a test module: only the attribute says which backend it is
        backend_name = name

    assert contract.backend_of(Wrapped()) is mod


def test_backend_of_something_else_is_named():
    with pytest.raises(dvt_core.InputError, match="not a dvt model: a list"):
        contract.backend_of([1, 2])
    with pytest.raises(dvt_core.InputError, match="unknown backend 'jax'"):
        contract.backend_of(type("M", (), {"backend_name": "jax"})())


# ---- behaviour every backend shares ------------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
def test_build_returns_the_model_in_evaluation_mode(name):
    _module(name)
    model = dvt_core.build("dvt_fashion_mnist", backend=name, weights="default")
    assert model.training is False
    if name == "torch":
        assert not any(m.training for m in model.modules())
    else:
        assert not any(c.training for _, c in model.cells_and_names())
    x = random_images(model.spec, 4)
    a = contract.backend_of(model).forward_numpy(model, x)
    b = contract.backend_of(model).forward_numpy(model, x)
    for u, v in zip(a, b):  # deterministic: dropout and stochastic depth are off
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("arch,overrides", [("dvt_t2t_vit_12", SMALL_T2T), ("dvt_deit_tiny", SMALL)])
def test_early_exit_takes_the_first_confident_exit_of_the_full_cascade(name, arch, overrides):
    """model.adaptive (the contract's loop) against the rule applied to every exit's logits in numpy."""
    mod = _module(name)
    model = dvt_core.build(arch, backend=name, **overrides)
    x = random_images(model.spec, 12, seed=3)
    full = mod.forward_numpy(model, x)
    probs = [np.exp(lg - lg.max(1, keepdims=True)) / np.exp(lg - lg.max(1, keepdims=True)).sum(1, keepdims=True)
             for lg in full]
    # about a third of the images leave at each exit, every threshold in a gap between confidences (none on one;
    # one framework on two batch sizes differs by about 1e-8, and small random models' confidences lie close)
    thresholds = spread_thresholds(np.array([p.max(axis=1) for p in probs]), gap=2e-6, slack=2)
    want_exit = np.array([next((i for i, p in enumerate(probs[:-1]) if p[k].max() >= thresholds[i]), len(full) - 1)
                          for k in range(len(x))])
    got = model.adaptive(x, thresholds)  # numpy in: the contract converts it
    assert 0 < got.exit_counts[0] < len(x) and got.exit_counts[-1] > 0  # images left at several exits
    np.testing.assert_array_equal(got.exit_index, want_exit)
    for i, e in enumerate(got.exit_index):  # each image's logits are the full cascade's at the exit it took
        np.testing.assert_allclose(got.logits[i], full[e][i], rtol=1e-4, atol=1e-4)
        assert got.prediction[i] == full[e][i].argmax()
    again = model.adaptive(mod.to_tensor(model, x), thresholds)  # the runtime's own tensors give the same
    np.testing.assert_array_equal(again.exit_index, got.exit_index)


@pytest.mark.parametrize("name", BACKENDS)
def test_file_round_trip_through_the_contract(name, tmp_path):
    mod = _module(name)
    state = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32([1.5])}
    path = tmp_path / ("f.pth" if name == "torch" else "f.ckpt")
    mod.write_file(path, state, {"note": "hello"})
    back = mod.read_file(path)
    if name == "torch":
        back = dict(back["state_dict"], note=back["note"])
    assert back["note"] == "hello"
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize("name", BACKENDS)
def test_stochastic_depth_schedule_comes_from_dvt_core(name):
    _module(name)
    model = dvt_core.build("dvt_deit_tiny", backend=name, **dict(SMALL, depth=4), drop_path_rate=0.3)
    spec = model.spec
    for i in range(spec.num_exits):
        got = [float(b.drop_path.p) for b in model.stages[i].blocks]
        assert got == drop_path_rates(spec, i)
    assert drop_path_rates(spec, 0) == pytest.approx([0.0, 0.1, 0.2, 0.3])


@pytest.mark.parametrize("name", BACKENDS)
def test_initialisation_follows_dvt_core_recipe(name):
    mod = _module(name)
    spec = dvt_core.get_spec("dvt_deit_tiny", **dict(SMALL, embed_dim=64))
    state = mod.model_state(mod.build_model(spec))
    linear = np.concatenate([v.ravel() for k, v in state.items() if k.endswith(("qkv.weight", "fc1.weight"))])
    assert abs(linear.std() - INIT_STD) < 0.1 * INIT_STD and np.abs(linear).max() <= TRUNC_BOUND
    assert abs(linear.mean()) < 0.1 * INIT_STD
    cls = np.concatenate([v.ravel() for k, v in state.items() if k.endswith(("cls_token", "pos_embed"))])
    assert 0.5 * INIT_STD < cls.std() < 1.5 * INIT_STD
    for k, v in state.items():
        if k.endswith(("norm1.weight", "norm.weight")):
            assert (v == 1).all(), k
        if k.endswith(("qkv.bias", "fc1.bias", "head.bias", "norm1.bias")):
            assert (v == 0).all(), k


def _token_norm_eps(model, name):
    norm = model.stages[0].tokenizer.attention1.norm1
    return float(norm.eps if name == "torch" else norm.epsilon)


@pytest.mark.parametrize("name", BACKENDS)
def test_token_module_layernorm_eps_is_read_from_the_spec(name):
    _module(name)
    spec = dvt_core.get_spec("dvt_t2t_vit_12", **SMALL_T2T)
    assert spec.stages[0].t2t.ln_eps == 1e-5  # the official token modules: nn.LayerNorm's default
    stages = tuple(dataclasses.replace(s, ln_eps=1e-6, t2t=dataclasses.replace(s.t2t, ln_eps=0.25))
                   for s in spec.stages)
    odd = dataclasses.replace(spec, stages=stages).validate()
    model = dvt_core.build(odd, backend=name)
    assert _token_norm_eps(model, name) == 0.25
    blk = model.stages[0].blocks[0].norm1
    assert float(blk.eps if name == "torch" else blk.epsilon) == 1e-6  # the stage's own eps stays the stage's
    assert dvt_core.CascadeSpec.from_dict(odd.to_dict()) == odd  # the field travels with the spec


def test_token_module_eps_must_be_positive():
    spec = dvt_core.get_spec("dvt_t2t_vit_12")
    bad = dataclasses.replace(spec.stages[0], t2t=dataclasses.replace(spec.stages[0].t2t, ln_eps=0.0))
    with pytest.raises(dvt_core.SpecError, match="t2t ln_eps must be positive"):
        dataclasses.replace(spec, stages=(bad,) + spec.stages[1:]).validate()


def test_an_import_error_of_dvt_itself_is_not_reported_as_a_missing_framework():
    """Only a missing or broken framework becomes "install the package"; dvt's own ImportError is a bug."""
    from dvt_core.runtimes import raised_by_dvt

    inside = str(Path(dvt_core.__file__).resolve().parent / "runtime" / "contract.py")
    try:
        exec(compile("raise ImportError('cannot import name helper')", inside, "exec"))
    except ImportError as exc:
        assert raised_by_dvt(exc)
    try:
        exec(compile("raise ImportError('libonnxruntime.so: cannot open shared object file')",
                     "/elsewhere/onnxruntime/__init__.py", "exec"))
    except ImportError as exc:
        assert not raised_by_dvt(exc)
    assert raised_by_dvt(ModuleNotFoundError("No module named 'dvt_core.gone'", name="dvt_core.gone"))
    assert not raised_by_dvt(ModuleNotFoundError("No module named 'torch'", name="torch"))
