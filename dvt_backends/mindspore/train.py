"""Training a DVT (or a static baseline) with MindSpore: the recipe of the torch trainer, step for step.

Multi-exit loss, AdamW (torch's update rule and defaults, the same parameter groups), cosine schedule
with warm-up, label smoothing, gradient clipping, the same batches (dvt_core.training.config), atomic
checkpoints (``last.ckpt`` to resume, ``<name>.ckpt`` with the same metadata as torch's
``.safetensors``), resume inside an epoch, seeds, and calibration of the default operating point on
the held-out part at the end. One process: a launcher's WORLD_SIZE above 1 is refused (see README).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import ops

from dvt_core.data import sources as dvt_data
from dvt_core.checkpoint.files import atomic_path, write_checkpoint
from dvt_core.errors import InputError
from dvt_core.runtime.evaluation import exit_probs
from dvt_core.checkpoint.naming import canonical_to_mindspore
from dvt_core.model.specs import CascadeSpec
from dvt_core.training.config import (TrainConfig, check_finite_loss, epoch_batches, final_meta, resolve_holdout, run_epoch,
                               steps_per_epoch)
from dvt_core.checkpoint.transfer import load_init, param_groups

from . import compat as C
from . import files
from .cascade import DVT
from .io import load_state, model_state, named_parameters

STATE_KEY = "dvt_train_state"  # the resumable state's JSON entry in last.ckpt


class AdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments, eps outside the square
    root) over canonically named MindSpore parameters, each with its group's weight decay."""

    def __init__(self, named: dict, groups: list[dict], betas=(0.9, 0.999), eps: float = 1e-8):
        self.names = [n for g in groups for n in g["names"]]
        self.params = [named[n] for n in self.names]
        self.decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = {n: ops.zeros_like(named[n]) for n in self.names}
        self.v = {n: ops.zeros_like(named[n]) for n in self.names}
        self.t = 0

    def step(self, grads, lr: float) -> None:
        self.t += 1
        bc1 = 1.0 - self.b1 ** self.t
        bc2_sqrt = (1.0 - self.b2 ** self.t) ** 0.5
        for n, p, g in zip(self.names, self.params, grads):
            m = self.m[n] * self.b1 + g * (1.0 - self.b1)
            v = self.v[n] * self.b2 + g * g * (1.0 - self.b2)
            self.m[n], self.v[n] = m, v
            new = p * (1.0 - lr * self.decay[n]) if self.decay[n] else p
            new = new - (m / (ops.sqrt(v) / bc2_sqrt + self.eps)) * (lr / bc1)
            ops.assign(p, new)

    def state(self) -> dict[str, np.ndarray]:
        out = {}
        for n in self.names:
            out[f"optimizer.exp_avg.{n}"] = C.to_numpy(self.m[n])
            out[f"optimizer.exp_avg_sq.{n}"] = C.to_numpy(self.v[n])
        return out

    def load(self, state: dict, t: int) -> None:
        for n in self.names:
            self.m[n] = C.to_tensor(state[f"optimizer.exp_avg.{n}"])
            self.v[n] = C.to_tensor(state[f"optimizer.exp_avg_sq.{n}"])
        self.t = int(t)


def make_optimizer(model: DVT, weight_decay: float) -> AdamW:
    """AdamW over every trainable parameter of every stage (timm's no-decay rule, as torch's trainer)."""
    named = {n: p for n, p in named_parameters(model).items() if p.requires_grad}
    return AdamW(named, param_groups(((n, len(C.shape_of(p))) for n, p in named.items()), weight_decay))


def make_train_step(model: DVT, opt: AdamW, cfg: TrainConfig):
    """``step(x, y, lr) -> loss`` (float): one multi-exit loss, gradient and AdamW update on numpy batches."""
    def forward(images, targets):
        return DVT.loss(model(images), targets, label_smoothing=cfg.label_smoothing)

    grad_fn = ms.value_and_grad(forward, None, opt.params)

    def step(xb: np.ndarray, yb: np.ndarray, lr: float, index: int = 0, epoch: int = 0) -> float:
        loss, grads = grad_fn(C.to_tensor(xb), C.index_tensor(yb))
        value = float(C.to_numpy(loss))
        check_finite_loss(value, index, epoch)
        if cfg.grad_clip:  # torch's clip_grad_norm_: one global norm, clipped to grad_clip
            total = float(np.sqrt(C.to_numpy(ops.addn([(g * g).sum() for g in grads]))))
            coef = cfg.grad_clip / (total + 1e-6)
            if coef < 1.0:
                grads = tuple(g * coef for g in grads)
        opt.step(grads, lr)
        return value

    return step


def check_resumable(state_path, spec: CascadeSpec) -> None:
    """InputError unless ``state_path`` (a trainer's last.ckpt) holds weights of ``spec``'s architecture."""
    try:
        saved = files.load(state_path)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot resume from {state_path}: not a readable training checkpoint ({first})") from None
    want = {canonical_to_mindspore(k): tuple(v.shape) for k, v in model_state(DVT(spec)).items()}
    have = {k: tuple(v.shape) for k, v in saved.items() if isinstance(v, np.ndarray) and not k.startswith(
        ("optimizer.", "rng_state"))}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have.get(k)]
        raise InputError(f"cannot resume from {state_path}: it holds another architecture than {spec.name} with "
                         f"these overrides ({len(diff)} tensors differ, e.g. {diff[0]}); use the same --model "
                         "and -O, or another --out")


def train(spec: CascadeSpec, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, out_dir,
          device: Optional[str] = None, resume: bool = False, progress: bool = True,
          extra_meta: Optional[dict] = None, init=None, dataset=None, init_state: Optional[dict] = None) -> Path:
    """Train ``spec`` on uint8 ``images`` and ``labels`` as the torch trainer does; returns the final weights
    path ``<out_dir>/<spec.name>.ckpt``. ``init_state`` (canonical numpy state) replaces the seeded
    initialisation, e.g. to start from torch's exact initial weights."""

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("MindSpore training runs in one process; data-parallel MindSpore training is not "
                         "built (see README); start `dvt train --backend mindspore` without a launcher")
    C.configure_runtime()
    if device is not None:
        from . import to_device

        to_device(None, device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = resolve_holdout(cfg, len(images))
    train_idx, hold_idx = dvt_data.split_holdout(len(images), cfg.holdout, cfg.seed)
    x_train, y_train = images[train_idx], labels[train_idx]

    ms.set_seed(cfg.seed)
    model = DVT(spec)
    init_report = None
    if init_state is not None:
        load_state(model, init_state, source="init_state")
    if init is not None:
        state, init_report = load_init(init, spec, model_state(model))
        load_state(model, state, source=str(init))
        print("\n".join(init_report.lines()), flush=True)
    opt = make_optimizer(model, cfg.weight_decay)
    step_fn = make_train_step(model, opt, cfg)
    spe = steps_per_epoch(len(x_train), cfg)
    total = spe * cfg.epochs
    warmup = int(cfg.warmup_epochs * spe)
    start_epoch, history, step, partial = 0, [], 0, (0.0, 0)
    state_path = out_dir / "last.ckpt"
    if resume and state_path.exists():
        saved = files.load(state_path)
        st = json.loads(saved[STATE_KEY])
        load_state(model, {k: saved[canonical_to_mindspore(k)] for k in model_state(model)}, source=str(state_path))
        opt.load(saved, st["adam_step"])
        history, step = st["history"], int(st["step"])
        start_epoch = step // spe
        if step % spe:
            history = history[:-1]
            partial = tuple(st["partial"])
        if "rng_state" in saved:
            ms.set_rng_state(ms.Tensor(saved["rng_state"]))
        init_report = st.get("init")
        print(f"resumed from {state_path} at epoch {start_epoch + 1}, step {step}")

    t0 = time.time()
    probs = None
    for epoch in range(start_epoch, cfg.epochs):
        model.set_train(True)
        batches = epoch_batches(x_train, y_train, cfg, epoch, spec.mean, spec.std)
        step, running, seen = run_epoch(step_fn, batches, cfg, epoch, step, spe, total, warmup, partial,
                                        progress=progress)
        model.set_train(False)
        record = {"epoch": epoch + 1, "loss": running / max(seen, 1), "seconds": round(time.time() - t0, 1)}
        if len(hold_idx):
            probs = exit_probs(model, images[hold_idx])
            record["holdout_accuracy"] = [float(a) for a in (probs.argmax(-1) == labels[hold_idx]).mean(1) * 100]
        history.append(record)
        accs = record.get("holdout_accuracy")
        acc_txt = " holdout acc " + "/".join(f"{a:.2f}" for a in accs) if accs else ""
        print(f"epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.4f}{acc_txt} ({record['seconds']} s)", flush=True)
        done = epoch + 1 == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
        if (epoch + 1) % cfg.checkpoint_every == 0 or done:
            st = {"epoch": epoch + 1, "step": step, "partial": [running, seen], "history": history,
                  "adam_step": opt.t, "init": init_report if isinstance(init_report, dict) or init_report is None
                  else init_report.to_meta()}
            params = {canonical_to_mindspore(k): v for k, v in model_state(model).items()}
            params.update(opt.state())
            params["rng_state"] = C.to_numpy(ms.get_rng_state())
            with atomic_path(state_path, force=True) as tmp:
                files.save(tmp, params, {STATE_KEY: json.dumps(st)})
        if done:
            break

    model.set_train(False)
    if probs is None and len(hold_idx):
        probs = exit_probs(model, images[hold_idx])
    final = out_dir / f"{spec.name}.ckpt"
    meta = final_meta(spec, cfg, history, images=len(images), hold_idx=hold_idx, labels=labels, probs=probs,
                      seconds=time.time() - t0, device=ms.get_context("device_target"), world=1,
                      backend="mindspore", init=init_report, dataset=dataset)
    meta.update(extra_meta or {})
    write_checkpoint(final, model_state(model), meta, fmt="mindspore", force=True)
    return final
