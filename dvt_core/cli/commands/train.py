"""``dvt train``: train a DVT or a static baseline (torchrun or msrun for several processes).

The command parses its options into a :class:`~dvt_core.training.config.TrainConfig` and calls
:func:`dvt_core.training.runs.train_dataset`, which makes every check.
"""
from __future__ import annotations

import argparse
import dataclasses

from dvt_core.schema import MAX_SEED, number
from dvt_core.cli.commands._shared import show_progress, add_common_options, check_device, parse_overrides
from dvt_core.errors import ArgumentError, ConfigError
from dvt_core.model.zoo import get_spec
from dvt_core.training.config import FOLDER_HOLDOUT, TrainConfig

HELP = "train a DVT or a static baseline (torchrun, or msrun for MindSpore, for several processes)"

# TrainConfig field -> its option (the options that set it)
OPTIONS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "weight_decay": "--weight-decay",
           "warmup_epochs": "--warmup-epochs", "seed": "--seed", "max_steps": "--max-steps", "holdout": "--holdout"}


def parse_holdout(text: str):
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
    d = TrainConfig()
    add_common_options(parser, weights=False, precision=False)  # training runs fp32
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="fashion-mnist (default) or a folder with one sub-folder per class")
    parser.add_argument("--out", default="runs/train", help="output folder (default runs/train): its training "
                        "state (last.pth / last.ckpt) and the final weights NAME.safetensors / NAME.ckpt")
    parser.add_argument("--name", default=None, help="the trained model's name, its file name (sanitised; "
                        "default: the folder's name, or the model's for fashion-mnist)")
    parser.add_argument("--init", default=None, metavar="FILE",
                        help="start from this checkpoint (any format build reads), or 'default' for the model's "
                             "shipped weights: tensors that fit are loaded, heads of another class count "
                             "re-initialised, position embeddings and patch kernels of other grids resampled")
    parser.add_argument("--epochs", type=number("int", 1, 1_000_000), default=None, help=f"epochs (default {d.epochs})")
    parser.add_argument("--batch-size", type=number("int", 1, 1 << 20), default=None,
                        help=f"global batch size, split over the processes (default {d.batch_size})")
    parser.add_argument("--lr", type=number("float", 0, low_open=True), default=None, help=f"peak AdamW learning rate (default {d.lr:g})")
    parser.add_argument("--weight-decay", type=number("float", 0), default=None, help=f"(default {d.weight_decay:g})")
    parser.add_argument("--warmup-epochs", type=number("float", 0, 1e6), default=None,
                        help=f"linear warm-up before the cosine decay (default {d.warmup_epochs:g})")
    parser.add_argument("--holdout", type=parse_holdout, default=None,
                        help="training images kept out for calibration: a count or a fraction "
                             f"(default: {d.holdout} for fashion-mnist, {FOLDER_HOLDOUT} of a folder)")
    parser.add_argument("--seed", type=number("int", 0, MAX_SEED), default=None, help=f"(default {d.seed})")
    parser.add_argument("--max-steps", type=number("int", 1, 1 << 40), default=None, help="stop after this many steps (default: none)")
    parser.add_argument("--no-augment", action="store_true", help="no random crops and flips")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pth (OUT/last.ckpt)")
    parser.add_argument("--force", action="store_true", help="train into an --out folder that holds a run")
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args) -> TrainConfig:
    """The options as a TrainConfig (``holdout`` None when not given: the data set's default)."""
    given = {field: getattr(args, field) for field in OPTIONS if getattr(args, field) is not None}
    cfg = dataclasses.replace(TrainConfig(), **{"holdout": None, **given})
    if args.no_augment:
        cfg.augment = False
    return cfg


def option_error(exc: ConfigError) -> ArgumentError:
    """A TrainConfig range error spelled with the option that set the field."""
    option = OPTIONS.get(exc.field)
    text = str(exc)
    if option and text.startswith(exc.field):
        text = option + text[len(exc.field):]
    return ArgumentError(text)


def run(args) -> int:
    from dvt_core.training.runs import train_dataset

    if args.model is None:
        raise ArgumentError("name a model to train with --model")
    if args.backend not in ("torch", "mindspore"):
        raise ArgumentError(f"unknown backend {args.backend!r}; choose torch or mindspore")
    overrides = parse_overrides(args.override)
    spec = get_spec(args.model, **overrides)
    check_device(args.backend, args.device)
    cfg = config_from_args(args)
    try:
        dataclasses.replace(cfg, holdout=cfg.holdout or 0).validate()  # option ranges, before any data is read
        train_dataset(args.dataset, spec, cfg, args.out, backend=args.backend, device=args.device, name=args.name,
                      resume=args.resume, force=args.force, init=args.init,
                      fixed_classes="num_classes" in overrides,
                      fixed_normalisation="mean" in overrides or "std" in overrides,
                      progress=not args.no_progress and show_progress(), log=_say)
    except ConfigError as exc:
        raise option_error(exc) from None
    return 0


def _say(line: str) -> None:
    print(line, flush=True)
