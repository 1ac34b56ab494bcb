"""Training a DVT (or a static baseline) with PyTorch: AdamW, cosine schedule, multi-exit loss.

Single process, or data-parallel over several processes started by ``torchrun`` (gloo on the CPU,
NCCL on GPUs): the launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK) is all it needs.
Checkpoints are written atomically every ``checkpoint_every`` epochs; ``resume=True`` continues from
the last one, bit for bit on the same machine.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from dvt_core.data import sources as dvt_data
from dvt_core.checkpoint.files import atomic_path, write_checkpoint
from dvt_core.runtime.evaluation import exit_probs
from dvt_core.model.shapes import state_diff, state_shapes
from dvt_core.model.specs import CascadeSpec
from dvt_core.training.config import (TrainConfig, check_finite_loss, epoch_batches, final_meta, resolve_holdout, run_epoch,
                               steps_per_epoch)
from dvt_core.checkpoint.transfer import load_init, param_groups

from .cascade import DVT
from .io import load_state, model_state


def check_resumable(state_path, spec: CascadeSpec) -> None:
    """InputError unless ``state_path`` (a trainer's last.pth) holds weights of ``spec``'s architecture."""
    from dvt_core.errors import InputError

    try:
        saved = torch.load(state_path, map_location="cpu", weights_only=True)["model"]
    except Exception as exc:  # a truncated or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot resume from {state_path}: not a readable training checkpoint ({first})") from None
    missing, unexpected, mismatched = state_diff(state_shapes(spec), saved)
    if missing or unexpected or mismatched:
        diff = missing + unexpected + mismatched
        raise InputError(f"cannot resume from {state_path}: it holds another architecture than {spec.name} with "
                         f"these overrides ({len(diff)} tensors differ, e.g. {diff[0]}); use the same --model "
                         "and -O, or another --out")


def optimizer_groups(model: DVT, weight_decay: float) -> list[dict]:
    """AdamW parameter groups over every trainable parameter of every stage (timm's no-decay rule)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = param_groups(((n, p.ndim) for n, p in params.items()), weight_decay)
    return [{"params": [params[n] for n in g["names"]], "weight_decay": g["weight_decay"]} for g in groups]


def make_optimizer(model: DVT, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr)


def make_train_step(model: DVT, net, opt: torch.optim.Optimizer, cfg: TrainConfig, dev=torch.device("cpu")):
    """``step(x, y, lr) -> loss`` (float): one multi-exit loss, gradient and AdamW update on numpy batches
    (``net`` is ``model`` or its DistributedDataParallel wrapper)."""
    def step(xb: np.ndarray, yb: np.ndarray, lr: float, index: int = 0, epoch: int = 0) -> float:
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.from_numpy(xb).to(dev, non_blocking=True)
        y = torch.from_numpy(np.asarray(yb, dtype=np.int64)).to(dev, non_blocking=True)
        loss = DVT.loss(net(x), y, label_smoothing=cfg.label_smoothing)
        value = float(loss.detach())
        check_finite_loss(value, index, epoch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        return value

    return step


def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _pick_device(device: Optional[str], local_rank: int) -> torch.device:
    if device:
        d = torch.device(device)
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", local_rank)
        return d
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def train(spec: CascadeSpec, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, out_dir,
          device: Optional[str] = None, resume: bool = False, progress: bool = True,
          extra_meta: Optional[dict] = None, init=None, dataset=None) -> Path:
    """Train ``spec`` on uint8 ``images`` (N, H, W[, C]) and ``labels``; returns the final weights path.

    ``cfg.holdout`` images (chosen by ``cfg.seed``) are kept out of training; their indices are saved
    so thresholds can later be calibrated on exactly them. Writes ``<out_dir>/last.pth`` (resumable
    state) and ``<out_dir>/<spec.name>.safetensors`` (weights + metadata, calibrated on the held-out
    part). ``init`` is a checkpoint to start from (:func:`dvt_core.checkpoint.transfer.load_init`). A loss that
    is not finite stops the run with :class:`dvt_core.training.config.TrainingDiverged` before any weights of
    that epoch are written.
    """

    world, rank, local = _dist_env()
    dev = _pick_device(device, local)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} does not split evenly over {world} processes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    main = rank == 0
    cfg = resolve_holdout(cfg, len(images))

    train_idx, hold_idx = dvt_data.split_holdout(len(images), cfg.holdout, cfg.seed)
    x_train, y_train = images[train_idx], labels[train_idx]

    torch.manual_seed(cfg.seed)
    model = DVT(spec)
    init_report = None
    if init is not None:
        state, init_report = load_init(init, spec, model_state(model))
        load_state(model, state, source=str(init))
        if main:
            print("\n".join(init_report.lines()), flush=True)
    model = model.to(dev)
    if rank:  # DDP broadcasts rank 0's weights; each process then draws its own stochastic-depth masks
        torch.manual_seed(cfg.seed * 1000 + rank)
    opt = make_optimizer(model, cfg)
    spe = steps_per_epoch(len(x_train), cfg)
    total = spe * cfg.epochs
    warmup = int(cfg.warmup_epochs * spe)
    start_epoch, history, step, partial = 0, [], 0, (0.0, 0)
    state_path = out_dir / "last.pth"
    if resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        history = json.loads(st["history"])
        step = int(st["step"]) if "step" in st else int(st["epoch"]) * spe
        start_epoch = step // spe
        if step % spe:  # stopped inside an epoch (--max-steps): its record is completed, not repeated
            history = history[:-1]
            partial = (float(st["partial"][0]), int(st["partial"][1]))
        if "init" in st:
            init_report = json.loads(st["init"])
        torch.set_rng_state(st["rng_cpu"])  # stochastic depth draws continue where they stopped
        if dev.type == "cuda" and "rng_cuda" in st:
            torch.cuda.set_rng_state(st["rng_cuda"], dev)
        if main:
            print(f"resumed from {state_path} at epoch {start_epoch + 1}, step {step}")
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    step_fn = make_train_step(model, net, opt, cfg, dev)

    t0 = time.time()
    probs = None
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        batches = epoch_batches(x_train, y_train, cfg, epoch, spec.mean, spec.std, rank, world)
        step, running, seen = run_epoch(step_fn, batches, cfg, epoch, step, spe, total, warmup, partial,
                                        progress=progress and main)
        record = {"epoch": epoch + 1, "loss": running / max(seen, 1), "seconds": round(time.time() - t0, 1)}
        if main and len(hold_idx):
            probs = exit_probs(model, images[hold_idx])  # the last epoch's also calibrates the result
            record["holdout_accuracy"] = [float(a) for a in (probs.argmax(-1) == labels[hold_idx]).mean(1) * 100]
        history.append(record)
        if main:
            accs = record.get("holdout_accuracy")
            acc_txt = " holdout acc " + "/".join(f"{a:.2f}" for a in accs) if accs else ""
            print(f"epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.4f}{acc_txt} ({record['seconds']} s)",
                  flush=True)
        done = epoch + 1 == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
        if main and ((epoch + 1) % cfg.checkpoint_every == 0 or done):
            with atomic_path(state_path, force=True) as tmp:
                state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                         "step": step, "partial": [running, seen], "history": json.dumps(history),
                         "rng_cpu": torch.get_rng_state()}
                if init_report is not None:
                    state["init"] = json.dumps(init_report if isinstance(init_report, dict)
                                               else init_report.to_meta())
                if dev.type == "cuda":
                    state["rng_cuda"] = torch.cuda.get_rng_state(dev)
                torch.save(state, tmp)
        if done:
            break

    final = out_dir / f"{spec.name}.safetensors"
    if main:
        if probs is None and len(hold_idx):  # resumed a finished run: nothing trained, calibrate anyway
            probs = exit_probs(model, images[hold_idx])
        meta = final_meta(spec, cfg, history, images=len(images), hold_idx=hold_idx, labels=labels, probs=probs,
                          seconds=time.time() - t0, device=str(dev), world=world, backend="torch",
                          init=init_report, dataset=dataset)
        meta.update(extra_meta or {})
        write_checkpoint(final, model_state(model), meta, force=True)
    if world > 1:
        torch.distributed.barrier()
    return final
