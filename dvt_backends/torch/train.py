"""PyTorch's side of training (:class:`dvt_core.training.trainer.Trainer`): AdamW, the multi-exit step,
the ``last.pth`` training state. The loop itself is :func:`dvt_core.training.loop.fit`.

Single process, or data-parallel over several processes started by ``torchrun`` (gloo on the CPU,
NCCL on GPUs): the launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK) is all it needs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dvt_core.checkpoint.transfer import param_groups
from dvt_core.model.specs import CascadeSpec
from dvt_core.training.config import TrainConfig
from dvt_core.training.trainer import Trainer

from .cascade import DVT
from .io import load_state, model_state


def optimizer_groups(model: DVT, weight_decay: float) -> list[dict]:
    """AdamW parameter groups over every trainable parameter of every stage (timm's no-decay rule)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = param_groups(((n, p.ndim) for n, p in params.items()), weight_decay)
    return [{"params": [params[n] for n in g["names"]], "weight_decay": g["weight_decay"]} for g in groups]


def make_optimizer(model: DVT, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr)


def distillation_loss(outputs, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over exits of KL(teacher || exit) between the temperature-softened distributions, times
    ``temperature**2`` (so the gradients keep their scale whatever the temperature)."""
    target = F.log_softmax(teacher_logits / temperature, dim=-1)
    return sum(F.kl_div(F.log_softmax(o / temperature, dim=-1), target, log_target=True, reduction="batchmean")
               for o in outputs) * temperature ** 2


def make_train_step(model: DVT, net, opt: torch.optim.Optimizer, cfg: TrainConfig, dev=torch.device("cpu"),
                    teacher: Optional[tuple] = None, frozen: Sequence = ()):
    """``step(x, y, lr) -> loss`` (float): one multi-exit loss, gradient and AdamW update on numpy batches
    (``net`` is ``model`` or its DistributedDataParallel wrapper). ``teacher`` ``(model, temperature,
    weight)`` adds the distillation term; the parameters in ``frozen`` (read at every step) get no update."""
    def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.from_numpy(xb).to(dev, non_blocking=True)
        y = torch.from_numpy(np.asarray(yb, dtype=np.int64)).to(dev, non_blocking=True)
        outputs = net(x)
        loss = DVT.loss(outputs, y, label_smoothing=cfg.label_smoothing)
        if teacher is not None:
            with torch.no_grad():
                taught = teacher[0](x)[-1]
            loss = loss + teacher[2] * distillation_loss(outputs, taught, teacher[1])
        value = float(loss.detach())
        if not np.isfinite(value):  # diverged: the loop stops the run; no update with a NaN gradient
            return value
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in frozen:  # no gradient: AdamW skips the parameter (no moment, no decay); DDP already reduced
            p.grad = None
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        return value

    return step


def _dist_env() -> tuple[int, int, int]:
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def _pick_device(device: Optional[str], local_rank: int) -> torch.device:
    if device:
        d = torch.device(device)
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", local_rank)
        return d
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


class TorchTrainer(Trainer):
    backend = "torch"
    state_file = "last.pth"
    weights_suffix = ".safetensors"
    weights_format = "safetensors"

    def __init__(self, spec: CascadeSpec, cfg: TrainConfig, device: Optional[str] = None):
        self.world, self.rank, local = _dist_env()
        self.dev = _pick_device(device, local)
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if self.dev.type == "cuda" else "gloo")
        if self.dev.type == "cuda":
            torch.cuda.set_device(self.dev)
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model = DVT(spec)
        self.net = self.opt = self._step = self.teacher = None
        self.frozen: list = []

    @property
    def device(self) -> str:
        return str(self.dev)

    def weights(self) -> dict:
        return model_state(self.model)

    def load_weights(self, state: dict, source: str) -> None:
        load_state(self.model, state, source=source)

    def prepare(self) -> None:
        self.model = self.model.to(self.dev)
        if self.rank:  # DDP broadcasts rank 0's weights; each process then draws its own stochastic-depth masks
            torch.manual_seed(self.cfg.seed * 1000 + self.rank)
        self.opt = make_optimizer(self.model, self.cfg)
        self.net = self.model
        if self.world > 1:
            ids = [self.dev.index] if self.dev.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self._step = make_train_step(self.model, self.net, self.opt, self.cfg, self.dev, self.teacher, self.frozen)

    def set_teacher(self, spec: CascadeSpec, state: dict, temperature: float, weight: float) -> None:
        teacher = DVT(spec).to(self.model.dtype)
        load_state(teacher, state, source="the teacher")
        teacher.eval().requires_grad_(False)
        self.teacher = (teacher.to(self.dev), float(temperature), float(weight))

    def freeze(self, names) -> None:
        params = dict(self.model.named_parameters())
        self.frozen[:] = [params[n] for n in names if n in params]  # in place: the step reads this list

    def step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> float:
        return self._step(images, labels, lr)

    def train_mode(self, on: bool) -> None:
        self.model.train(on)

    def save_state(self, path, record: dict) -> None:
        import json

        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "record": json.dumps(record), "epoch": record["epoch"], "step": record["step"],
                 "rng_cpu": torch.get_rng_state()}
        if self.dev.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.dev)
        torch.save(state, path)

    def load_state(self, path) -> dict:
        import json

        st = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        torch.set_rng_state(st["rng_cpu"])  # stochastic depth draws continue where they stopped
        if self.dev.type == "cuda" and "rng_cuda" in st:
            torch.cuda.set_rng_state(st["rng_cuda"], self.dev)
        return json.loads(st["record"])

    def saved_weights(self, path) -> dict:
        return torch.load(Path(path), map_location="cpu", weights_only=True)["model"]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def make_trainer(spec: CascadeSpec, cfg: TrainConfig, device: Optional[str] = None) -> TorchTrainer:
    return TorchTrainer(spec, cfg, device)


def train(spec: CascadeSpec, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, out_dir,
          device: Optional[str] = None, **options) -> Path:
    """:func:`dvt_core.training.loop.fit` with this backend (the options are ``fit``'s)."""
    from dvt_core.training.loop import fit

    return fit(spec, images, labels, cfg, out_dir, backend="torch", device=device, **options)
