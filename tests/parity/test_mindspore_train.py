"""The MindSpore DVT trains: gradients reach every trainable parameter and an optimizer step lowers the loss.

Mirrors the PyTorch backend's training test, on a small override model, and checks that ``DVT.loss``
(sum of per-exit cross entropies) and the gradients agree with torch's for the same weights.
"""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="the MindSpore backend needs mindspore")
torch = pytest.importorskip("torch", reason="the gradients are compared with the PyTorch backend's")

import dvt_backends.mindspore as bm  # noqa: E402
import dvt_backends.torch as bt  # noqa: E402
import dvt_core  # noqa: E402

from .conftest import random_images, small_overrides  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.mindspore]

TARGETS = np.array([0, 3, 9], np.int32)


def grad_fn(model, x, targets):
    params = model.trainable_params()

    def forward(images, labels):
        return bm.DVT.loss(model(images), labels)

    return ms.value_and_grad(forward, None, params), params


@pytest.mark.parametrize("name", ["dvt_t2t_vit_12", "dvt_deit_small"])
def test_gradients_flow_and_step_lowers_loss(name):
    ms.set_seed(1)
    ov = dict(small_overrides(name), drop_path_rate=0.1)  # the training step exercises stochastic depth
    model = dvt_core.build(name, backend="mindspore", **ov)
    spec = model.spec
    assert spec.feature_reuse and spec.relation_reuse
    x = ms.Tensor(random_images(spec, len(TARGETS), seed=3))
    y = ms.Tensor(TARGETS)

    # the same weights in torch: loss and gradients agree (no dropout: eval mode in both)
    model.set_train(False)
    tm = dvt_core.build(name, backend="torch", **ov).eval()
    bt.load_state(tm, bm.model_state(model))
    step, params = grad_fn(model, x, y)
    loss, grads = step(x, y)
    t_out = tm(torch.from_numpy(x.asnumpy()))
    t_loss = bt.DVT.loss(t_out, torch.from_numpy(TARGETS).long())
    t_loss.backward()
    assert abs(float(loss.asnumpy()) - float(t_loss.detach())) < 1e-5
    t_grads = {n: p.grad for n, p in tm.named_parameters() if p.requires_grad}
    names = [dvt_core.naming.mindspore_to_canonical(p.name) for p in params]
    assert set(names) == set(t_grads), "trainable parameters differ between the backends"
    for n, g in zip(names, grads):
        np.testing.assert_allclose(g.asnumpy(), t_grads[n].numpy(), rtol=1e-3, atol=1e-6, err_msg=n)

    # every trainable parameter gets a finite gradient; only the last block's feature-reuse MLP of the
    # last stage has none to get (its output never reaches the class token that the head reads)
    g = {n: gr.asnumpy() for n, gr in zip(names, grads)}
    assert all(np.isfinite(v).all() for v in g.values())
    zero = {n for n, v in g.items() if not np.abs(v).sum() > 0}
    last = f"stages.{spec.num_exits - 1}.blocks.{spec.stages[-1].depth - 1}.feature_reuse."
    assert zero == {n for n in g if n.startswith(last)}, sorted(zero)
    frozen = {dvt_core.naming.mindspore_to_canonical(n) for n, p in model.parameters_and_names()
              if not p.requires_grad}
    expected_frozen = ({f"stages.{i}.{p}" for i in range(spec.num_exits)
                        for p in ("pos_embed", "tokenizer.attention1.w", "tokenizer.attention2.w")}
                       if "t2t" in name else set())
    assert frozen == expected_frozen
    before_frozen = {n: p.asnumpy().copy() for n, p in model.parameters_and_names() if not p.requires_grad}

    # one optimizer step, in training mode (dropout / stochastic depth on), lowers the eval loss
    drop = [c for _, c in model.cells_and_names() if type(c).__name__ == "DropPath" and c.p > 0]
    assert drop, "no stochastic depth to exercise"
    model.set_train(True)
    opt = ms.nn.SGD(params, learning_rate=0.05)
    train_step, _ = grad_fn(model, x, y)
    loss_train, grads = train_step(x, y)
    opt(grads)
    model.set_train(False)
    after, _ = step(x, y)
    assert float(after.asnumpy()) < float(loss.asnumpy()) - 1e-3, (float(loss.asnumpy()), float(after.asnumpy()))
    for n, p in model.parameters_and_names():
        if not p.requires_grad:
            np.testing.assert_array_equal(p.asnumpy(), before_frozen[n], err_msg=f"frozen {n} changed")


def test_loss_weights_and_label_smoothing():
    rng = np.random.default_rng(0)
    out = [rng.standard_normal((4, 5)).astype(np.float32) for _ in range(2)]
    t = np.array([0, 1, 2, 3], np.int32)
    ms_out, ms_t = [ms.Tensor(o) for o in out], ms.Tensor(t)
    t_out, t_t = [torch.from_numpy(o) for o in out], torch.from_numpy(t).long()
    for kw in ({}, {"weights": [0.25, 2.0]}, {"label_smoothing": 0.1}):
        a = float(bm.DVT.loss(ms_out, ms_t, **kw).asnumpy())
        b = float(bt.DVT.loss(t_out, t_t, **kw))
        assert abs(a - b) < 1e-5, (kw, a, b)
