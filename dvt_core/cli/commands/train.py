"""``dvt train``: train a DVT or a static baseline (torchrun for several processes)."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from dvt_core.errors import DVTError
from dvt_core.schema import MAX_SEED, check_train_config, number
from dvt_core.training.config import FOLDER_HOLDOUT, TrainConfig, resolve_holdout
from dvt_core.model.zoo import get_spec
from dvt_core.data.datasets import dataset_record, is_fashion_mnist as _is_fashion_mnist, load_dataset
from dvt_core.cli.commands._shared import UserError, _progress, add_common_options, check_device, parse_overrides

HELP = "train a DVT or a static baseline (torchrun for several processes)"


def _holdout(text: str):
    """``--holdout``: a count of images (``500``) or a fraction of them (``0.1``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction such as 0.1, got {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    if value < 1 and value != 0:
        return value
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"a count of images is a whole number; a fraction lies below 1, got {text}")
    return int(value)


def add_arguments(parser) -> None:
    add_common_options(parser, weights=False, precision=False)  # training runs fp32
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist or a folder with one sub-folder per class")
    parser.add_argument("--out", default="runs/train", help="output folder (checkpoints, final weights)")
    parser.add_argument("--init", default=None, metavar="FILE",
                        help="start from this checkpoint (any format build reads): tensors that fit are loaded, "
                             "heads of another class count re-initialised, position embeddings and patch "
                             "kernels of other grids resampled")
    parser.add_argument("--epochs", type=number("int", 1, 1_000_000), default=None)
    parser.add_argument("--batch-size", type=number("int", 1, 1 << 20), default=None, help="global batch size")
    parser.add_argument("--lr", type=number("float", 0, low_open=True), default=None)
    parser.add_argument("--weight-decay", type=number("float", 0), default=None)
    parser.add_argument("--warmup-epochs", type=number("float", 0, 1e6), default=None)
    parser.add_argument("--holdout", type=_holdout, default=None,
                        help="training images kept out for calibration: a count or a fraction "
                             f"(default: {TrainConfig().holdout} for fashion-mnist, {FOLDER_HOLDOUT} of a folder)")
    parser.add_argument("--seed", type=number("int", 0, MAX_SEED), default=None)
    parser.add_argument("--max-steps", type=number("int", 1, 1 << 40), default=None, help="stop after this many steps")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pth (OUT/last.ckpt)")
    parser.add_argument("--force", action="store_true", help="train into an --out folder that holds a run")
    parser.add_argument("--no-progress", action="store_true")


def _trainer(backend: str):
    """The backend's training module (its import errors said plainly)."""
    import importlib

    from dvt_core.runtime.builder import get_backend

    get_backend(backend)
    return importlib.import_module(f"dvt_backends.{backend}.train")


def run(args) -> int:
    if args.model is None:
        raise UserError("name a model to train with --model")
    if args.backend not in ("torch", "mindspore"):
        raise UserError(f"unknown backend {args.backend!r}; choose torch or mindspore")
    overrides = parse_overrides(args.override)
    spec = get_spec(args.model, **overrides)
    check_device(args.backend, args.device)
    if args.init is not None and not Path(args.init).is_file():
        raise UserError(f"--init file not found: {args.init}")
    out = Path(args.out)
    state_name = "last.pth" if args.backend == "torch" else "last.ckpt"
    state = out / state_name
    final = out / f"{spec.name}.{'safetensors' if args.backend == 'torch' else 'ckpt'}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if not args.resume and not args.force and (state.exists() or final.exists()):
        raise UserError(f"{out} already holds a training run ({(state if state.exists() else final).name}); "
                        "pass --resume to continue it, --force to train over it, or another --out")
    cfg = TrainConfig()
    for field, value in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                         ("weight_decay", args.weight_decay), ("warmup_epochs", args.warmup_epochs),
                         ("seed", args.seed), ("max_steps", args.max_steps)):
        if value is not None:
            setattr(cfg, field, value)
    if args.no_augment:
        cfg.augment = False
    check_train_config(cfg, "train")  # the library's checks: what a Python caller of the trainer gets too
    for option, value, low in (("--epochs", cfg.epochs, 1), ("--batch-size", cfg.batch_size, 1),
                               ("--max-steps", cfg.max_steps, 1)):
        if value is not None and value < low:
            raise UserError(f"{option} must be at least {low}, got {value}")
    if not cfg.lr > 0:
        raise UserError(f"--lr must be positive, got {cfg.lr:g}")
    fashion = _is_fashion_mnist(args.dataset)
    images, labels, classes = load_dataset(args.dataset, "train", spec)
    if len(labels) == 0:
        raise UserError(f"{args.dataset} holds no images")
    n_classes = int(labels.max()) + 1
    if not fashion and n_classes != spec.num_classes:
        if "num_classes" in overrides:
            raise UserError(f"{args.dataset} has {n_classes} classes ({', '.join(classes)}) but -O num_classes="
                            f"{spec.num_classes}; drop the override or make them agree")
        print(f"{args.dataset} has {n_classes} classes: training {spec.name} with num_classes={n_classes} "
              f"(the zoo entry has {spec.num_classes})")
        spec = get_spec(spec, num_classes=n_classes)
        final = out / f"{spec.name}.{final.suffix.lstrip('.')}"
    elif n_classes > spec.num_classes:
        raise UserError(f"{args.dataset} has {n_classes} classes but {spec.name} predicts "
                        f"{spec.num_classes}; pass -O num_classes={n_classes}")
    cfg.holdout = args.holdout if args.holdout is not None else (cfg.holdout if fashion else FOLDER_HOLDOUT)
    try:
        cfg = resolve_holdout(cfg, len(labels))
    except DVTError as exc:
        raise UserError(f"--holdout: {exc}") from None
    n_train = len(labels) - cfg.holdout
    if n_train < 1:
        given = "" if args.holdout is not None else " (the default)"
        raise UserError(f"{args.dataset} has {len(labels)} training images and --holdout {cfg.holdout}{given} keeps "
                        "them all out of training for calibration; pass a smaller --holdout (e.g. 0.1)")
    if n_train < cfg.batch_size:
        raise UserError(f"the batch size {cfg.batch_size} is larger than the {n_train} training images "
                        f"({len(labels)} minus {cfg.holdout} held out); pass a smaller --batch-size")
    trainer = _trainer(args.backend)
    if args.resume and not state.exists():
        print(f"nothing to resume ({state} does not exist): starting from scratch")
    elif args.resume:
        trainer.check_resumable(state, spec)
    if args.device is not None:  # a device the backend cannot use: said before any work
        from dvt_core.runtime.builder import get_backend

        if args.backend == "torch":
            get_backend("torch").to_device(trainer.DVT(get_spec(spec, depth=1)), args.device)
    if args.force and not args.resume:
        for stale in (state, final):
            if stale.exists():
                stale.unlink()

    t0 = time.time()
    path = trainer.train(spec, images, labels, cfg, out, device=args.device, resume=args.resume,
                         progress=not args.no_progress and _progress(), init=args.init,
                         extra_meta={"classes": classes, "dataset": dataset_record(args.dataset)})
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path} in {time.time() - t0:.0f} s (default operating point calibrated on "
              f"{cfg.holdout} held-out images)")
    return 0
