"""``dvt train``: train a DVT or a static baseline (torchrun for several processes)."""
from __future__ import annotations

import time
from pathlib import Path

from ..zoo import get_spec
from ._shared import (UserError, parse_overrides, add_common_options, load_dataset, _progress)

HELP = "train a DVT or a static baseline (torchrun for several processes)"


def add_arguments(parser) -> None:
    add_common_options(parser, weights=False)
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist or a folder with one sub-folder per class")
    parser.add_argument("--out", default="runs/train", help="output folder (checkpoints, final weights)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--warmup-epochs", type=float, default=None)
    parser.add_argument("--holdout", type=int, default=None, help="training images kept out for calibration")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pth")
    parser.add_argument("--no-progress", action="store_true")


def _check_resumable(state: Path, spec) -> None:
    """InputError unless ``state`` (a trainer's last.pth) holds the weights of ``spec``'s architecture."""
    from dvt_backends.torch.train import check_resumable

    check_resumable(state, spec)


def run(args) -> int:
    from ..training import TrainConfig

    if args.model is None:
        raise UserError("name a model to train with --model")
    if args.backend != "torch":
        raise UserError("`dvt train` runs on the torch backend; fine-tune in MindSpore with "
                        "(see README)")
    spec = get_spec(args.model, **parse_overrides(args.override))
    cfg = TrainConfig()
    for field, value in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                         ("weight_decay", args.weight_decay), ("warmup_epochs", args.warmup_epochs),
                         ("holdout", args.holdout), ("seed", args.seed), ("max_steps", args.max_steps)):
        if value is not None:
            setattr(cfg, field, value)
    if args.no_augment:
        cfg.augment = False
    for option, value, low in (("--epochs", cfg.epochs, 1), ("--batch-size", cfg.batch_size, 1),
                               ("--holdout", cfg.holdout, 0), ("--max-steps", cfg.max_steps, 1)):
        if value is not None and value < low:
            raise UserError(f"{option} must be at least {low}, got {value}")
    if not cfg.lr > 0:
        raise UserError(f"--lr must be positive, got {cfg.lr:g}")
    images, labels, classes = load_dataset(args.dataset, "train", spec)
    if labels.max() >= spec.num_classes:
        raise UserError(f"{args.dataset} has {labels.max() + 1} classes but {spec.name} predicts "
                        f"{spec.num_classes}; pass -O num_classes={labels.max() + 1}")
    n_train = len(labels) - cfg.holdout
    if n_train < 1:
        given = "" if args.holdout is not None else " (the default)"
        raise UserError(f"{args.dataset} has {len(labels)} training images and --holdout {cfg.holdout}{given} keeps "
                        "them all out of training for calibration; pass a smaller --holdout")
    if n_train < cfg.batch_size:
        raise UserError(f"the batch size {cfg.batch_size} is larger than the {n_train} training images "
                        f"({len(labels)} minus {cfg.holdout} held out); pass a smaller --batch-size")
    state = Path(args.out) / "last.pth"
    if args.resume and not state.exists():
        print(f"nothing to resume ({state} does not exist): starting from scratch")
    elif args.resume:
        _check_resumable(state, spec)
    from dvt_backends.torch.train import train

    t0 = time.time()
    path = train(spec, images, labels, cfg, args.out, device=args.device, resume=args.resume,
                 progress=not args.no_progress and _progress(),
                 extra_meta={"classes": classes, "dataset": args.dataset})
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path} in {time.time() - t0:.0f} s")
    return 0
