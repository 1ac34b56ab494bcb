"""MindSpore's side of training (:class:`dvt_core.training.trainer.Trainer`): the torch trainer's recipe,
step for step, under the one loop (:func:`dvt_core.training.loop.fit`).

Multi-exit loss, AdamW (torch's update rule and defaults, the same parameter groups), gradient
clipping, the ``last.ckpt`` training state (weights, AdamW moments, the generator's state, the loop's
record) and ``<name>.ckpt`` final weights. Data-parallel over the processes MindSpore's launcher
``msrun`` starts (CPU included: the gradients are averaged with one ``AllReduce`` per step); another
launcher's WORLD_SIZE above 1 is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import ops

from dvt_core.checkpoint.naming import canonical_to_mindspore, mindspore_to_canonical
from dvt_core.checkpoint.transfer import param_groups
from dvt_core.errors import InputError
from dvt_core.model.specs import CascadeSpec
from dvt_core.training.config import TrainConfig
from dvt_core.training.trainer import Trainer

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
        self.frozen: set = set()  # names held still: no moment, no decay, no update (torch's skipped gradient)
        self.m = {n: ops.zeros_like(named[n]) for n in self.names}
        self.v = {n: ops.zeros_like(named[n]) for n in self.names}
        self.t = 0

    def step(self, grads, lr: float) -> None:
        self.t += 1
        bc1 = 1.0 - self.b1 ** self.t
        bc2_sqrt = (1.0 - self.b2 ** self.t) ** 0.5
        for n, p, g in zip(self.names, self.params, grads):
            if n in self.frozen:
                continue
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


def distillation_loss(outputs, teacher_logits, temperature: float):
    """Sum over exits of KL(teacher || exit) between the temperature-softened distributions, times
    ``temperature**2`` (torch's trainer's term)."""
    log_t = ops.log_softmax(teacher_logits / temperature, -1)
    total = None
    for o in outputs:
        term = (ops.exp(log_t) * (log_t - ops.log_softmax(o / temperature, -1))).sum() / o.shape[0]
        total = term if total is None else total + term
    return total * temperature ** 2


def make_train_step(model: DVT, opt: AdamW, cfg: TrainConfig, world: int = 1, teacher: Optional[tuple] = None):
    """``step(x, y, lr) -> loss`` (float): one multi-exit loss, gradient and AdamW update on numpy batches;
    with ``world > 1`` (under msrun) the gradients are averaged over the processes first. ``teacher``
    ``(model, temperature, weight)`` adds the distillation term; ``opt.frozen`` names get no update."""
    def forward(images, targets, taught):
        outputs = model(images)
        loss = DVT.loss(outputs, targets, label_smoothing=cfg.label_smoothing)
        if teacher is not None:
            loss = loss + teacher[2] * distillation_loss(outputs, taught, teacher[1])
        return loss

    grad_fn = ms.value_and_grad(forward, None, opt.params)
    all_reduce = ops.AllReduce() if world > 1 else None

    def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        x = C.to_tensor(xb)
        taught = ops.stop_gradient(teacher[0](x)[-1]) if teacher is not None else ops.zeros((1,), ms.float32)
        loss, grads = grad_fn(x, C.index_tensor(yb), taught)
        value = float(C.to_numpy(loss))
        if not np.isfinite(value):  # diverged: the loop stops the run; no update with a NaN gradient
            return value
        if all_reduce is not None:
            grads = _mean_over_processes(all_reduce, grads, world)
        if opt.frozen:  # left out of the clipping norm too, as torch's absent gradients are
            grads = tuple(ops.zeros_like(g) if n in opt.frozen else g for n, g in zip(opt.names, grads))
        if cfg.grad_clip:  # torch's clip_grad_norm_: one global norm, clipped to grad_clip
            total = float(np.sqrt(C.to_numpy(ops.addn([(g * g).sum() for g in grads]))))
            coef = cfg.grad_clip / (total + 1e-6)
            if coef < 1.0:
                grads = tuple(g * coef for g in grads)
        opt.step(grads, lr)
        return value

    return step


def _mean_over_processes(all_reduce, tensors, world: int) -> tuple:
    """Every process's ``tensors`` averaged, in one AllReduce of their concatenation (what DDP does)."""
    shapes = [t.shape for t in tensors]
    flat = all_reduce(ops.cat([t.reshape(-1) for t in tensors])) / world
    out, at = [], 0
    for shape in shapes:
        size = int(np.prod(shape)) if len(shape) else 1
        out.append(flat[at:at + size].reshape(shape))
        at += size
    return tuple(out)


def _launch_env() -> tuple[int, int]:
    """``(world, rank)``: msrun's processes join MindSpore's collective communication here; any other
    launcher's several processes are refused."""
    if os.environ.get("MS_ROLE"):  # started by msrun (the scheduler process never returns from init)
        from mindspore.communication import get_group_size, get_rank, init

        init()
        return int(get_group_size()), int(get_rank())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("MindSpore data-parallel training is started by msrun (e.g. `msrun --worker_num=2 "
                         "--local_worker_num=2 --join=True $(which dvt) train --backend mindspore ...`), not by "
                         "torchrun")
    return 1, 0


class MindSporeTrainer(Trainer):
    backend = "mindspore"
    state_file = "last.ckpt"
    weights_suffix = ".ckpt"
    weights_format = "mindspore"

    def __init__(self, spec: CascadeSpec, cfg: TrainConfig, device: Optional[str] = None):
        C.configure_runtime()
        if device is not None:
            from . import RUNTIME

            RUNTIME.to_device(None, device)
        self.world, self.rank = _launch_env()
        self.cfg = cfg
        ms.set_seed(cfg.seed)
        self.model = DVT(spec)
        self.opt = self._step = self.teacher = None
        self.frozen: set = set()

    @property
    def device(self) -> str:
        return ms.get_context("device_target")

    def weights(self) -> dict:
        return model_state(self.model)

    def load_weights(self, state: dict, source: str) -> None:
        load_state(self.model, state, source=source)

    def prepare(self) -> None:
        if self.world > 1:  # every process starts from the same weights (the same seed draws them; made sure)
            params = named_parameters(self.model)
            names = list(params)
            mean = _mean_over_processes(ops.AllReduce(), [params[n] for n in names], self.world)
            for n, value in zip(names, mean):
                ops.assign(params[n], value)
        if self.rank:  # each process draws its own dropout / stochastic-depth masks
            ms.set_seed(self.cfg.seed * 1000 + self.rank)
        self.opt = make_optimizer(self.model, self.cfg.weight_decay)
        self.opt.frozen = self.frozen  # one set: freeze() changes it in place
        self._step = make_train_step(self.model, self.opt, self.cfg, self.world, self.teacher)

    def set_teacher(self, spec: CascadeSpec, state: dict, temperature: float, weight: float) -> None:
        teacher = DVT(spec)
        load_state(teacher, state, source="the teacher")
        teacher.set_train(False)
        for p in teacher.get_parameters():
            p.requires_grad = False
        self.teacher = (teacher, float(temperature), float(weight))

    def freeze(self, names) -> None:
        self.frozen.clear()
        self.frozen.update(names)

    def step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> float:
        return self._step(images, labels, lr)

    def train_mode(self, on: bool) -> None:
        self.model.set_train(on)

    def save_state(self, path, record: dict) -> None:
        params = {canonical_to_mindspore(k): v for k, v in model_state(self.model).items()}
        params.update(self.opt.state())
        params["rng_state"] = C.to_numpy(ms.get_rng_state())
        files.save(path, params, {STATE_KEY: json.dumps({"record": record, "adam_step": self.opt.t})})

    def load_state(self, path) -> dict:
        saved = files.load(path)
        st = json.loads(saved[STATE_KEY])
        load_state(self.model, {k: saved[canonical_to_mindspore(k)] for k in model_state(self.model)},
                   source=str(path))
        self.opt.load(saved, st["adam_step"])
        if "rng_state" in saved:
            ms.set_rng_state(ms.Tensor(saved["rng_state"]))
        return st["record"]

    def saved_weights(self, path) -> dict:
        return {mindspore_to_canonical(k): v for k, v in files.load(path).items()
                if isinstance(v, np.ndarray) and not k.startswith(("optimizer.", "rng_state"))}

    def barrier(self) -> None:
        if self.world > 1:  # an AllReduce every process must reach
            ops.AllReduce()(ms.Tensor(np.zeros(1, np.float32))).asnumpy()


def make_trainer(spec: CascadeSpec, cfg: TrainConfig, device: Optional[str] = None) -> MindSporeTrainer:
    return MindSporeTrainer(spec, cfg, device)


def train(spec: CascadeSpec, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, out_dir,
          device: Optional[str] = None, **options) -> Path:
    """:func:`dvt_core.training.loop.fit` with this backend (the options are ``fit``'s; ``init_state``,
    canonical numpy weights, replaces the seeded initialisation, e.g. to start from torch's)."""
    from dvt_core.training.loop import fit

    return fit(spec, images, labels, cfg, out_dir, backend="mindspore", device=device, **options)
