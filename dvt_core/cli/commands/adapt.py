"""``dvt adapt``: a DVT with every stage initialised from one static ViT, then fine-tuned with distillation.

The command parses its options and calls :func:`dvt_core.training.adapt.adapt`, which makes every check.
"""
from __future__ import annotations

import argparse
import dataclasses

from dvt_core.cli.commands._shared import add_common_options, check_device, parse_overrides, show_progress
from dvt_core.errors import ArgumentError
from dvt_core.cli.commands.train import parse_holdout, config_from_args, option_error
from dvt_core.errors import ConfigError
from dvt_core.model.zoo import get_spec
from dvt_core.schema import MAX_SEED, number
from dvt_core.training.adapt import FREEZE_EPOCHS, RECIPE
from dvt_core.training.config import TrainConfig

HELP = "make a static ViT adaptive: a DVT with every stage from one static checkpoint, fine-tuned with distillation"

EPOCHS, BATCH, LR, WARMUP = (RECIPE[k] for k in ("epochs", "batch_size", "lr", "warmup_epochs"))


def add_arguments(parser) -> None:
    add_common_options(parser, weights=False, precision=False)  # training runs fp32
    parser.add_argument("--static", required=True, metavar="FILE",
                        help="the static model: this project's (static_*), timm's ViT / DeiT state dict or a "
                             "T2T-ViT's (.pth, .pth.tar, .safetensors, .ckpt; model / state_dict wrappers unwrapped)")
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="fashion-mnist (default) or a folder with one sub-folder per class")
    parser.add_argument("--out", required=True, help="output folder: NAME.safetensors (NAME.ckpt), and the "
                        "training state last.pth (last.ckpt) when fine-tuned")
    parser.add_argument("--name", default=None, help="the model's file name (default: the model's)")
    parser.add_argument("--epochs", type=number("int", 0, 1_000_000), default=EPOCHS,
                        help=f"fine-tuning epochs (default {EPOCHS}); 0 writes the initialised cascade, reading no data")
    parser.add_argument("--distill-weight", type=number("float", 0), default=1.0,
                        help="weight of the distillation from the frozen static model (default 1; 0: none)")
    parser.add_argument("--temperature", type=number("float", 0, low_open=True), default=2.0,
                        help="softmax temperature of the distillation (default 2)")
    parser.add_argument("--freeze-epochs", type=number("int", 0, 1_000_000), default=FREEZE_EPOCHS,
                        help="hold the last stage still (all its weights) for this many first epochs "
                             f"(default {FREEZE_EPOCHS}; at most --epochs)")
    parser.add_argument("--batch-size", type=number("int", 1, 1 << 20), default=BATCH,
                        help=f"global batch size (default {BATCH})")
    parser.add_argument("--lr", type=number("float", 0, low_open=True), default=LR, help=f"peak AdamW rate (default {LR:g})")
    parser.add_argument("--weight-decay", type=number("float", 0), default=None,
                        help=f"(default {TrainConfig().weight_decay:g})")
    parser.add_argument("--warmup-epochs", type=number("float", 0, 1e6), default=WARMUP, help=f"(default {WARMUP:g})")
    parser.add_argument("--holdout", type=parse_holdout, default=None,
                        help="training images kept out for calibration: a count or a fraction (default as dvt train)")
    parser.add_argument("--seed", type=number("int", 0, MAX_SEED), default=None, help=f"(default {TrainConfig().seed})")
    parser.add_argument("--max-steps", type=number("int", 1, 1 << 40), default=None, help="stop after this many steps")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=RECIPE["augment"],
                        help="random crops and flips (default: --no-augment, the measured recipe)")
    parser.add_argument("--force", action="store_true", help="write into an --out folder that holds a model")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from dvt_core.training.adapt import Distillation, adapt

    if args.model is None:
        raise ArgumentError("name the DVT to build with --model (e.g. dvt_fashion_mnist, dvt_deit_small)")
    if args.backend not in ("torch", "mindspore"):
        raise ArgumentError(f"unknown backend {args.backend!r}; choose torch or mindspore")
    spec = get_spec(args.model, **parse_overrides(args.override))
    check_device(args.backend, args.device)
    cfg = None
    if args.epochs:
        cfg = config_from_args(argparse.Namespace(**vars(args), no_augment=not args.augment))
        try:
            dataclasses.replace(cfg, holdout=cfg.holdout or 0).validate()  # option ranges, before any data is read
        except ConfigError as exc:
            raise option_error(exc) from None
    adapt(args.static, spec, args.out, cfg=cfg, dataset=args.dataset, backend=args.backend, device=args.device,
          distill=Distillation(args.distill_weight, args.temperature), freeze_epochs=args.freeze_epochs,
          name=args.name, force=args.force, progress=not args.no_progress and show_progress(),
          log=lambda line: print(line, flush=True))
    return 0
