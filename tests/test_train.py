"""The PyTorch trainer (``dvt_backends.torch.train.train``) and ``dvt train`` under torchrun.

A tiny Fashion-MNIST-shaped DVT (one block per stage, width 16) trains on synthetic uint8 images whose
class is the position of a bright square (mirrored, so the flip augmentation keeps the class): the
loss must fall, checkpoints must appear atomically with their metadata, a run killed mid-way and
resumed must end with the very weights of an uninterrupted run, and the learning rate must follow
``dvt_core.training.config.cosine_lr``. A two-process data-parallel run (gloo, CPU) started by torchrun
must match a one-process run over the same global batches.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dvt_core
from dvt_backends.torch import train as trainer
from dvt_backends.torch.cascade import DVT
from dvt_backends.torch.io import model_state
from dvt_core.checkpoint.files import read_checkpoint
from dvt_core.model.macs import exit_macs
from dvt_core.training.config import TrainConfig, cosine_lr, steps_per_epoch

from helpers import N_IMAGES, TINY, _write_image_folder, synthetic

REPO = Path(__file__).resolve().parents[1]
HOLDOUT = 40
BASE = dict(epochs=5, batch_size=32, lr=3e-3, warmup_epochs=1.0, holdout=HOLDOUT, pad=0, seed=0)


def tiny_spec(**extra):
    return dvt_core.get_spec("dvt_fashion_mnist", **{**TINY, **extra})


def states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = {k: float(np.abs(a[k] - b[k]).max()) for k in a if not np.array_equal(a[k], b[k])}
    assert not bad, f"weights differ: {sorted(bad.items(), key=lambda kv: -kv[1])[:5]}"


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted run: (final weights path, out folder, config)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    cfg = TrainConfig(**BASE)
    path = trainer.train(tiny_spec(), *data, cfg, out, progress=False)
    return path, out, cfg


# ---- one process ----------------------------------------------------------------------------------

def test_writes_checkpoints_with_metadata(reference, data):
    path, out, cfg = reference
    spec = tiny_spec()
    assert path == out / f"{spec.name}.safetensors"
    assert listing(out) == {"last.pth", f"{spec.name}.safetensors"}, "temporary files left behind"

    ckpt = read_checkpoint(path)
    meta = ckpt.meta
    assert meta["arch"] == spec.name
    assert meta["spec"] == json.loads(json.dumps(spec.to_dict()))
    assert dvt_core.CascadeSpec.from_dict(meta["spec"]) == spec
    assert meta["exit_macs"] == exit_macs(spec)
    assert meta["train"] == cfg.to_dict()
    assert meta["world_size"] == 1 and meta["holdout"] == HOLDOUT
    assert [h["epoch"] for h in meta["history"]] == list(range(1, cfg.epochs + 1))
    for h in meta["history"]:
        assert np.isfinite(h["loss"]) and len(h["holdout_accuracy"]) == spec.num_exits

    # last.pth holds the same weights plus what resuming needs
    state = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == cfg.epochs
    assert json.loads(state["history"]) == meta["history"]
    states_equal({k: v.numpy() for k, v in state["model"].items()}, ckpt.state)

    # the spec travels with the weights: the file rebuilds the trained model
    model = dvt_core.build(weights=path)
    assert model.spec == spec
    states_equal(model_state(model), ckpt.state)

    # the optimiser's last learning rate is the schedule's value at the last step
    spe = steps_per_epoch(N_IMAGES - HOLDOUT, cfg)
    total, warmup = spe * cfg.epochs, int(cfg.warmup_epochs * spe)
    last_lr = cosine_lr(total - 1, total, warmup, cfg.lr, cfg.min_lr)
    for group in state["optimizer"]["param_groups"]:
        assert group["lr"] == pytest.approx(last_lr, rel=1e-12)


def test_loss_falls_on_a_learnable_task(reference, data):
    path, _, cfg = reference
    history = read_checkpoint(path).meta["history"]
    losses = [h["loss"] for h in history]
    assert losses[-1] < losses[0] - 0.5, f"loss did not fall: {losses}"
    assert all(b < a for a, b in zip(losses, losses[1:])), f"loss not falling epoch by epoch: {losses}"
    # held-out images (never trained on) are classified well above chance (10 %) by some exit
    assert max(history[-1]["holdout_accuracy"]) >= 25.0, history[-1]


def test_resume_after_a_crash_gives_the_uninterrupted_weights(reference, data, tmp_path, monkeypatch):
    """Kill the run in the middle of epoch 4 (after epoch 3's checkpoint), resume: same weights, bit for
    bit, and the same per-epoch losses."""
    ref_path, _, cfg = reference
    spe = steps_per_epoch(N_IMAGES - HOLDOUT, cfg)
    crash_at = 3 * spe + 2

    def dying_lr(step, *args):
        if step == crash_at:
            raise KeyboardInterrupt("simulated crash")
        return cosine_lr(step, *args)

    with monkeypatch.context() as m:
        m.setattr("dvt_core.training.config.cosine_lr", dying_lr)  # the epoch loop every trainer runs
        with pytest.raises(KeyboardInterrupt):
            trainer.train(tiny_spec(), *data, TrainConfig(**BASE), tmp_path, progress=False)
    assert listing(tmp_path) == {"last.pth"}, "a crash must leave only complete files"
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 3

    path = trainer.train(tiny_spec(), *data, TrainConfig(**BASE), tmp_path, resume=True, progress=False)
    assert listing(tmp_path) == {"last.pth", path.name}
    got, want = read_checkpoint(path), read_checkpoint(ref_path)
    states_equal(got.state, want.state)
    assert [h["loss"] for h in got.meta["history"]] == [h["loss"] for h in want.meta["history"]]
    assert [h["holdout_accuracy"] for h in got.meta["history"]] == [h["holdout_accuracy"] for h in want.meta["history"]]

    # resuming a finished run trains nothing more and rewrites the same weights
    again = trainer.train(tiny_spec(), *data, TrainConfig(**BASE), tmp_path, resume=True, progress=False)
    states_equal(read_checkpoint(again).state, want.state)
    assert len(read_checkpoint(again).meta["history"]) == cfg.epochs


def test_failed_checkpoint_write_keeps_the_previous_one(data, tmp_path, monkeypatch):
    """A save that dies half-way leaves the last good last.pth in place and no temporary file."""
    cfg = dict(BASE, epochs=2, max_steps=steps_per_epoch(N_IMAGES - HOLDOUT, TrainConfig(**BASE)))
    trainer.train(tiny_spec(), *data, TrainConfig(**cfg), tmp_path, progress=False)
    before = (tmp_path / "last.pth").read_bytes()
    final = tmp_path / "dvt_fashion_mnist.safetensors"
    final_before = final.read_bytes()

    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.train(tiny_spec(), *data, TrainConfig(**dict(cfg, max_steps=None)), tmp_path, resume=True,
                      progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert listing(tmp_path) == {"last.pth", final.name}, "temporary files left behind"
    assert (tmp_path / "last.pth").read_bytes() == before
    assert final.read_bytes() == final_before


def test_resume_is_exact_with_stochastic_depth(data, tmp_path):
    spec = tiny_spec(depth=2)  # drop path 0 / 0.1 on the two blocks of each stage
    cfg = dict(BASE, epochs=2)
    spe = steps_per_epoch(N_IMAGES - HOLDOUT, TrainConfig(**cfg))
    ref = trainer.train(spec, *data, TrainConfig(**cfg), tmp_path / "a", progress=False)
    trainer.train(spec, *data, TrainConfig(**dict(cfg, max_steps=spe)), tmp_path / "b", progress=False)
    got = trainer.train(spec, *data, TrainConfig(**cfg), tmp_path / "b", resume=True, progress=False)
    states_equal(read_checkpoint(got).state, read_checkpoint(ref).state)


# ---- learning-rate schedule ---------------------------------------------------------------------------

def test_cosine_schedule_warmup_and_end_values():
    peak, floor, total, warmup = 1e-3, 1e-5, 100, 10
    lrs = [cosine_lr(s, total, warmup, peak, floor) for s in range(total + 5)]
    # linear warm-up from peak / warmup to the peak
    for s in range(warmup):
        assert lrs[s] == pytest.approx(peak * (s + 1) / warmup, rel=1e-12)
    assert lrs[warmup - 1] == pytest.approx(peak) and lrs[warmup] == pytest.approx(peak)
    # half way through the decay: the mean of peak and floor
    assert cosine_lr(warmup + (total - warmup) // 2, total, warmup, peak, floor) == pytest.approx((peak + floor) / 2)
    # falls monotonically to the floor at total_steps, and stays there
    decay = lrs[warmup:total + 1]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    assert lrs[total] == pytest.approx(floor, rel=1e-12)
    assert floor < lrs[total - 1] < floor + 1e-3 * (peak - floor)
    assert all(lr == pytest.approx(floor, rel=1e-12) for lr in lrs[total:])
    assert all(floor <= lr <= peak for lr in lrs)
    # no warm-up: starts at the peak
    assert cosine_lr(0, total, 0, peak, floor) == pytest.approx(peak)
    assert cosine_lr(total, total, 0, peak, floor) == pytest.approx(floor)
    # a degenerate schedule (warm-up as long as the run) does not divide by zero
    assert cosine_lr(total, total, total, peak, floor) == pytest.approx(peak)


def test_trainer_follows_the_schedule(data, tmp_path, monkeypatch):
    """Every optimiser step runs at cosine_lr(step, total, warmup, lr, min_lr)."""
    cfg = TrainConfig(**dict(BASE, epochs=2, holdout=HOLDOUT))
    seen = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append({g["lr"] for g in self.param_groups})
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    trainer.train(tiny_spec(), *data, cfg, tmp_path, progress=False)
    spe = steps_per_epoch(N_IMAGES - HOLDOUT, cfg)
    total, warmup = spe * cfg.epochs, int(cfg.warmup_epochs * spe)
    assert len(seen) == total
    for step, lrs in enumerate(seen):
        assert lrs == {cosine_lr(step, total, warmup, cfg.lr, cfg.min_lr)}


# ---- two processes through torchrun ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_data_parallel_matches_one_process(tmp_path):
    """torchrun, 2 CPU processes (gloo): each takes half of every global batch and DDP averages the
    gradients, so the weights match one process on the same global batches (no augmentation, whose
    draws are per process; no stochastic depth at depth 1)."""
    images, labels = synthetic(60, seed=1)
    dataset = tmp_path / "images"
    _write_image_folder(dataset, images, labels)
    out = tmp_path / "ddp"
    overrides = [f"{k}={v}" for k, v in TINY.items()]
    args = ["train", "--dataset", str(dataset), "--model", "dvt_fashion_mnist",
            *[a for o in overrides for a in ("-O", o)],
            "--epochs", "1", "--max-steps", "2", "--holdout", "20", "--batch-size", "16", "--no-augment",
            "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "dvt_core", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    final = out / "dvt_fashion_mnist.safetensors"
    assert listing(out) == {"last.pth", final.name}
    ddp = read_checkpoint(final)
    assert ddp.meta["world_size"] == 2
    assert ddp.meta["classes"] == [f"class{c}" for c in range(10)]

    # the same run in one process, on the images as `dvt train` loads them
    from dvt_core.data.datasets import load_dataset

    spec = tiny_spec()
    x, y, _ = load_dataset(str(dataset), "train", spec)
    cfg = TrainConfig(epochs=1, batch_size=16, holdout=20, max_steps=2, augment=False)
    single = read_checkpoint(trainer.train(spec, x, y, cfg, tmp_path / "single", progress=False))
    assert single.meta["train"] == ddp.meta["train"]

    torch.manual_seed(cfg.seed)
    init = model_state(DVT(spec))  # the weights both runs start from
    moved = max(float(np.abs(single.state[k] - init[k]).max()) for k in init)
    diff = {k: float(np.abs(single.state[k] - ddp.state[k]).max()) for k in init}
    assert moved > 1e-4, "training did not change the weights"
    assert max(diff.values()) < 1e-4, f"DDP and one process differ: {sorted(diff.items(), key=lambda kv: -kv[1])[:5]}"
    # and they are not equal merely because nothing happened to the compared tensors
    assert sum(np.abs(single.state[k] - init[k]).sum() for k in init) > 100 * sum(diff.values())
