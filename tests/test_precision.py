"""Precision as an option (``build(..., precision=)``, ``--precision``): bf16 / fp16 run the whole torch
network in that dtype, keep the exit decisions of fp32, and a backend without lower precision refuses it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dvt_core
from dvt_core.data import sources as data
from helpers import dvt, needs_fashion, needs_mindspore
from dvt_core.runtime import evaluation, policy

TINY = dict(img_size=32, grids=[2, 3, 4], depth=1, embed_dim=32, num_heads=2)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_every_weight_and_activation_is_in_the_chosen_dtype(precision, dtype):
    model = dvt_core.build("dvt_deit_tiny", precision=precision, **TINY)
    assert model.precision == precision
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} <= {dtype}
    seen = set()
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype) if torch.is_tensor(out) else None)
             for m in model.modules()]
    images = torch.randn(3, 3, 32, 32)  # float32 in: cast on entry
    outputs = model(images)
    for h in hooks:
        h.remove()
    assert seen == {dtype}, f"modules computed in {seen}: a float32 island in the {precision} path"
    assert all(o.dtype == dtype for o in outputs)
    result = model.adaptive(images, [0.5, 0.5])
    assert len(result.exit_index) == 3
    # the state leaves the model as float32 numpy, as every checkpoint writer expects
    from dvt_core.runtime.contract import backend_of

    assert {a.dtype for a in backend_of(model).model_state(model).values()} == {np.dtype(np.float32)}


def test_fp32_is_the_default_and_set_precision_goes_back():
    model = dvt_core.build("dvt_deit_tiny", **TINY)
    assert model.precision == "fp32" and next(model.parameters()).dtype == torch.float32
    model.set_precision("bf16").set_precision("fp32")
    assert next(model.parameters()).dtype == torch.float32


def test_unknown_precision_is_refused_before_anything_is_built():
    with pytest.raises(dvt_core.InputError, match="the torch runtime runs fp32, bf16, fp16, not 'int8'"):
        dvt_core.build("dvt_deit_tiny", precision="int8", **TINY)


@pytest.mark.mindspore
@needs_mindspore
def test_mindspore_refuses_lower_precision_clearly():
    with pytest.raises(dvt_core.InputError, match="the mindspore runtime runs fp32, not 'bf16': .*no bf16 MatMul"):
        dvt_core.build("static_fashion_mnist_2x2", backend="mindspore", weights="default", precision="bf16")


def test_cli_precision_runs_bf16_and_refuses_what_a_runtime_lacks(tmp_path):
    from PIL import Image

    picture = tmp_path / "shirt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(picture)
    r = dvt("predict", picture, "--model", "dvt_fashion_mnist", "--precision", "bf16", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[0])["path"].endswith("shirt.png")
    r = dvt("predict", picture, "--model", "dvt_fashion_mnist", "--precision", "fp8")
    assert r.returncode == 2 and "invalid choice: 'fp8'" in r.stderr and "Traceback" not in r.stderr


@needs_fashion
def test_bf16_keeps_the_exit_decisions_of_fp32_on_fashion_mnist():
    x, y = data.load_fashion_mnist("test")
    fp32 = dvt_core.build("dvt_fashion_mnist", weights="default")
    bf16 = dvt_core.build("dvt_fashion_mnist", weights="default", precision="bf16")
    thresholds = fp32.checkpoint_meta["thresholds"]  # the default operating point
    a = evaluation.adaptive(fp32, x, thresholds)
    b = evaluation.adaptive(bf16, x, thresholds)
    pa, pb = a.prediction, b.prediction
    agree = float((pa == pb).mean())
    assert agree >= 0.99, f"bf16 agrees with fp32 on {agree:.2%} of the test predictions"
    acc_a, acc_b = float((pa == y).mean()) * 100, float((pb == y).mean()) * 100
    assert abs(acc_a - acc_b) <= 0.3, f"accuracy fp32 {acc_a:.2f} % vs bf16 {acc_b:.2f} %"
    assert acc_a == pytest.approx(fp32.checkpoint_meta["default_operating_point"]["test_accuracy"], abs=0.05)
    # the per-exit accuracies too (the budget curve's corners)
    probs = [evaluation.exit_probs(m, x) for m in (fp32, bf16)]
    np.testing.assert_allclose(policy.anytime_accuracy(probs[1], y), policy.anytime_accuracy(probs[0], y), atol=0.3)
