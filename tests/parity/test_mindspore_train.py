"""The MindSpore DVT trains: gradients reach every trainable parameter and an optimizer step lowers the loss.

Mirrors the PyTorch backend's training test, on a small override model, and checks that ``DVT.loss``
(sum of per-exit cross entropies) and the gradients agree with torch's for the same weights.
"""
from __future__ import annotations

import dataclasses

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
    bt.RUNTIME.load_state(tm, bm.RUNTIME.model_state(model))
    step, params = grad_fn(model, x, y)
    loss, grads = step(x, y)
    t_out = tm(torch.from_numpy(x.asnumpy()))
    t_loss = bt.DVT.loss(t_out, torch.from_numpy(TARGETS).long())
    t_loss.backward()
    assert abs(float(loss.asnumpy()) - float(t_loss.detach())) < 1e-5
    t_grads = {n: p.grad for n, p in tm.named_parameters() if p.requires_grad}
    names = [dvt_core.checkpoint.naming.mindspore_to_canonical(p.name) for p in params]
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
    frozen = {dvt_core.checkpoint.naming.mindspore_to_canonical(n) for n, p in model.parameters_and_names()
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


def _t2t_spec(token_type="performer", dropout=None, **extra):
    """The small T2T-ViT override spec with the token modules' ``token_type`` and (when given) ``dropout``."""
    name = "dvt_t2t_vit_12"
    spec = dvt_core.get_spec(name, **dict(small_overrides(name), **extra))
    return _with_t2t(spec, token_type=token_type, **({} if dropout is None else {"dropout": dropout}))


def _with_t2t(spec, **fields):
    """``spec`` with ``fields`` replaced in every stage's tokens-to-token spec (stages without one unchanged)."""
    return dataclasses.replace(spec, stages=tuple(
        dataclasses.replace(s, t2t=dataclasses.replace(s.t2t, **fields)) if s.t2t is not None else s
        for s in spec.stages)).validate()


@pytest.mark.parametrize("token_type", ["performer", "transformer"])
def test_t2t_token_module_gradients_match_torch_relatively(token_type):
    """The T2T token modules' gradients are ~1e-6 in size, below the absolute tolerance above, so they are
    compared per tensor relative to the tensor's largest torch gradient: max |g_ms - g_t| / max |g_t|.
    Measured on the 2-core CPU (performer): at most 1.6e-6, i.e. float32 rounding."""
    spec = _t2t_spec(token_type, drop_path_rate=0.0)
    torch.manual_seed(0)
    tm = bt.DVT(spec).eval()
    mm = bm.DVT(spec)
    bm.RUNTIME.load_state(mm, bt.RUNTIME.model_state(tm))
    mm.set_train(False)
    x = random_images(spec, len(TARGETS), seed=5)
    t_loss = bt.DVT.loss(tm(torch.from_numpy(x)), torch.from_numpy(TARGETS).long(), label_smoothing=0.1)
    t_loss.backward()
    params = mm.trainable_params()
    m_loss, grads = ms.value_and_grad(lambda a, b: bm.DVT.loss(mm(a), b, label_smoothing=0.1), None, params)(
        ms.Tensor(x), ms.Tensor(TARGETS))
    assert abs(float(m_loss.asnumpy()) - float(t_loss.detach())) < 1e-5
    t_grads = {n: p.grad.numpy() for n, p in tm.named_parameters() if p.requires_grad}
    rel = {}
    for p, g in zip(params, grads):
        n = dvt_core.checkpoint.naming.mindspore_to_canonical(p.name)
        if ".tokenizer." in n:
            scale = float(np.abs(t_grads[n]).max())
            assert scale > 0, f"{n}: no gradient reaches the token module"
            rel[n] = float(np.abs(g.asnumpy() - t_grads[n]).max()) / scale
    kinds = {"attention1.mlp.fc1", "attention1.mlp.fc2", "attention2.mlp.fc1", "attention2.mlp.fc2",
             "attention1.norm2", "attention2.norm2", "project"}
    assert all(any(f".tokenizer.{k}." in n for n in rel) for k in kinds), sorted(rel)
    worst = sorted(rel.items(), key=lambda kv: -kv[1])[:3]
    assert worst[0][1] < 1e-4, worst


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


# ---- training parity: the same initial weights and batches give the same AdamW trajectory -------------

def _trajectories(name, steps, batch, **extra):
    """Per-step losses and final weights of ``steps`` AdamW steps in torch and in MindSpore, from torch's
    initial weights, on the same random batches, dropout and stochastic depth off.

    ``drop_path_rate=0`` turns off stochastic depth only: the T2T token modules keep their own dropout
    (``T2TSpec.dropout``, 0.1 as in the official Performer), whose masks the two frameworks draw apart.
    Left on, it parts the token modules' MLP weights after a few AdamW steps (about 15 % of all weights
    by up to 0.0095) although the losses agree: the token MLPs' outputs barely reach the loss at
    initialisation, but their gradients (~1e-6) are masked differently and AdamW makes each a full step."""
    from dvt_backends.mindspore import train as mtrain
    from dvt_backends.torch import train as ttrain
    from dvt_core.training.config import TrainConfig, cosine_lr

    ov = dict(extra, drop_path_rate=0.0)
    spec = _with_t2t(dvt_core.get_spec(name, **ov), dropout=0.0)
    cfg = TrainConfig(lr=2e-3, weight_decay=0.05, label_smoothing=0.1, grad_clip=1.0)
    torch.manual_seed(0)
    tm = bt.DVT(spec)
    mm = bm.DVT(spec)
    live = ([n for n, m in tm.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
            + [n for n, c in mm.cells_and_names() if isinstance(c, ms.nn.Dropout) and c.p > 0])
    assert not live, f"dropout left on: {live}"
    bm.RUNTIME.load_state(mm, bt.RUNTIME.model_state(tm))
    t_step = ttrain.make_train_step(tm, tm, ttrain.make_optimizer(tm, cfg), cfg)
    m_step = mtrain.make_train_step(mm, mtrain.make_optimizer(mm, cfg.weight_decay), cfg)
    tm.train()
    mm.set_train(True)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((batch, spec.in_chans, spec.img_size, spec.img_size)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, batch)
    t_losses, m_losses = [], []
    for s in range(steps):  # one batch, fitted step after step
        lr = cosine_lr(s, steps, 1, cfg.lr, cfg.min_lr)
        t_losses.append(t_step(x, y, lr))
        m_losses.append(m_step(x, y, lr))
    return np.array(t_losses), np.array(m_losses), bt.RUNTIME.model_state(tm), bm.RUNTIME.model_state(mm), spec


def _assert_same_trajectory(t_losses, m_losses, t_state, m_state, outliers=0.0, bound=0.0):
    """Losses within 1e-5 relative, weights within 1e-4. ``outliers``: the fraction of weights allowed
    beyond 1e-4 (never beyond the ``bound`` that flipped steps can reach): a gradient element that is a
    sum cancelling to float32 rounding noise gets a full learning-rate step from AdamW (which divides
    by the gradient's own size) whose sign the two frameworks' rounding decides."""
    np.testing.assert_allclose(m_losses, t_losses, rtol=1e-5)
    assert t_state.keys() == m_state.keys()
    worst = {k: float(np.abs(t_state[k] - m_state[k]).max()) for k in t_state}
    far = sum(int((np.abs(t_state[k] - m_state[k]) > 1e-4).sum()) for k in t_state)
    size = sum(v.size for v in t_state.values())
    top = sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    assert far <= outliers * size, f"{far} of {size} weights differ by more than 1e-4: {top}"
    assert max(worst.values()) <= max(bound, 1e-4), top


@pytest.mark.parametrize("name", ["dvt_deit_small", "dvt_t2t_vit_12"])
def test_adamw_steps_match_torch(name):
    steps = 3
    t_losses, m_losses, t_state, m_state, _ = _trajectories(name, steps=steps, batch=4, **small_overrides(name))
    assert t_losses[-1] < t_losses[0] - 0.05, t_losses  # the steps do train
    _assert_same_trajectory(t_losses, m_losses, t_state, m_state, outliers=1e-3, bound=2 * 2e-3 * steps)


@pytest.mark.slow
def test_one_full_size_adamw_step_matches_torch():
    t_losses, m_losses, t_state, m_state, spec = _trajectories("dvt_deit_small", steps=1, batch=2)
    assert spec.img_size == 224 and [s.grid for s in spec.stages] == [7, 10, 14]
    _assert_same_trajectory(t_losses, m_losses, t_state, m_state, outliers=1e-6, bound=2 * 2e-3)


def test_trainers_agree_end_to_end(tmp_path):
    """dvt_backends.torch.train.train and dvt_backends.mindspore.train.train on the same images and batches
    (no augmentation, no stochastic depth), MindSpore started from torch's seeded initial weights: the
    same epoch losses, final weights and calibrated thresholds."""
    from dvt_backends.mindspore import train as mtrain
    from dvt_backends.torch import train as ttrain
    from dvt_core.checkpoint.files import read_checkpoint
    from dvt_core.training.config import TrainConfig

    spec = dvt_core.get_spec("dvt_fashion_mnist", depth=1, embed_dim=16, num_heads=2, feature_reuse_dim=4,
                             feature_reuse_hidden=8, drop_path_rate=0.0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (56, 28, 28)).astype(np.uint8)
    labels = np.arange(56) % 10
    cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-3, warmup_epochs=0.5, holdout=8, augment=False, seed=3)
    t_path = ttrain.train(spec, images, labels, cfg, tmp_path / "torch", progress=False)
    torch.manual_seed(cfg.seed)
    init = bt.RUNTIME.model_state(bt.DVT(spec))
    m_path = mtrain.train(spec, images, labels, cfg, tmp_path / "ms", progress=False, init_state=init)
    assert m_path.name == "dvt_fashion_mnist.ckpt" and (tmp_path / "ms" / "last.ckpt").exists()
    t, m = read_checkpoint(t_path), read_checkpoint(m_path)
    assert m.format == "mindspore" and m.meta["backend"] == "mindspore"
    np.testing.assert_allclose([h["loss"] for h in m.meta["history"]], [h["loss"] for h in t.meta["history"]],
                               rtol=1e-5)
    moved = max(float(np.abs(t.state[k] - init[k]).max()) for k in init)
    assert moved > 1e-3
    _assert_same_trajectory(np.zeros(1), np.zeros(1), t.state, m.state)
    for key in ("train", "holdout", "exit_macs", "spec"):
        assert m.meta[key] == t.meta[key], key
    assert len(m.meta["thresholds"]) == spec.num_exits and m.meta["default_operating_point"]["rule"]
