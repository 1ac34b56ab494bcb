"""The ``dvt`` command line (also ``python -m dvt_core``).

Subcommands share one parser and the options ``--backend`` and ``--device``. A user error (missing
file, unreadable image, unknown model, bad budget, ...) exits with status 2 and one line on stderr;
an internal error keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import DVTError
from .specs import SpecError

EXIT_USER_ERROR = 2


class UserError(DVTError):
    """A problem with what the user asked for; printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USER_ERROR)


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def parse_overrides(items: Optional[Sequence[str]]) -> dict:
    """``["num_classes=10", "grids=[2,4,7]"]`` -> dict (values parsed as YAML scalars/lists)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise UserError(f"override {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


def _common(p: argparse.ArgumentParser, model: bool = True, weights: bool = True) -> None:
    p.add_argument("--backend", default="torch", help="torch (default) or mindspore")
    p.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:1, mps) or MindSpore target")
    if model:
        p.add_argument("--model", default=None, help="zoo model name (see `dvt flops --list`)")
        p.add_argument("--override", "-O", action="append", metavar="KEY=VALUE",
                       help="spec override, e.g. -O num_classes=10 -O grids=[2,4,7] (repeatable)")
    if weights:
        p.add_argument("--weights", default=None,
                       help="checkpoint file (.pth.tar, .pth, .safetensors, .ckpt) or 'default'")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dvt", description="Dynamic Vision Transformer: adaptive token grids with early exit.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("demo", help="the shipped Fashion-MNIST DVT on sample images")
    _common(p, model=False, weights=False)
    p.add_argument("--out", default="dvt_demo.png", help="where to write the picture (PNG)")
    p.add_argument("--full", action="store_true", help="use the whole installed test set, not the samples")
    p.add_argument("--budget", type=float, default=None, help="target average MACs per image")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file ('-' for stdout)")
    p.add_argument("--limit", type=int, default=None, help="rows of the per-image table to print")

    p = sub.add_parser("predict", help="classify image files with early exit")
    p.add_argument("inputs", nargs="+", help="image files (PNG/JPEG) or folders of them")
    _common(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=float, default=None,
                   help="target average MACs per image: the most accurate operating point calibrated in the "
                        "checkpoint whose held-out average cost fits")
    g.add_argument("--thresholds", default=None, help="comma-separated confidence thresholds, one per exit")
    p.add_argument("--json", action="store_true", help="one JSON object per image")

    p = sub.add_parser("evaluate", help="anytime accuracy and the budget curve on a data set")
    _common(p)
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist or a folder with one sub-folder per class")
    p.add_argument("--split", default="test", choices=["train", "test", "holdout"])
    p.add_argument("--calibration", default="holdout", choices=["holdout", "same"],
                   help="where thresholds are found: the held-out training part (default) or the evaluated split")
    p.add_argument("--json", default=None, help="write the results as JSON here ('-' for stdout)")
    p.add_argument("--plot", default=None, help="write the accuracy-MACs plot (PNG) here")
    p.add_argument("--baselines", default="auto", help="static baselines to plot: auto, none, or comma-separated names")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--calibration-limit", type=int, default=None, metavar="N",
                   help="find thresholds on only the first N held-out images (quick runs; default: all)")

    p = sub.add_parser("calibrate", help="store the thresholds for a target average cost in a checkpoint")
    _common(p)
    p.add_argument("--budget", type=float, required=True, help="target average MACs per image")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--out", default=None, help="checkpoint to write (default: overwrite --weights)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="calibrate on only the first N held-out images (quick runs; default: all)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--json", default=None, help="write the result as JSON here ('-' for stdout)")

    p = sub.add_parser("flops", help="MACs and parameters per stage and per exit")
    p.add_argument("name", nargs="?", help="zoo model name")
    p.add_argument("--list", action="store_true", help="list the zoo")
    p.add_argument("--override", "-O", action="append", metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("convert", help="convert a checkpoint between official, torch, safetensors and MindSpore")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--arch", default=None, help="model name (needed when SRC carries no architecture)")
    p.add_argument("--to", default=None, choices=["torch", "mindspore", "safetensors"],
                   help="output format (default: from DST's suffix)")
    p.add_argument("--force", action="store_true", help="overwrite DST")
    p.add_argument("--override", "-O", action="append", metavar="KEY=VALUE")

    p = sub.add_parser("train", help="train a DVT or a static baseline (torchrun for several processes)")
    _common(p, weights=False)
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist or a folder with one sub-folder per class")
    p.add_argument("--out", default="runs/train", help="output folder (checkpoints, final weights)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch size")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--holdout", type=int, default=None, help="training images kept out for calibration")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pth")
    p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import commands
    from .data import DataError

    handler = getattr(commands, f"cmd_{args.command}")
    try:
        return int(handler(args) or 0)
    except (DVTError, SpecError, DataError, FileExistsError, FileNotFoundError, IsADirectoryError,
            PermissionError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)) and exc.filename:
            msg = f"{exc.strerror or 'cannot open'}: {exc.filename}"
        sys.stderr.write(f"dvt {args.command}: error: {msg}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


def emit_json(obj, dest: Optional[str]) -> None:
    """Write ``obj`` as JSON to ``dest`` ('-' = stdout) atomically."""
    if dest is None:
        return
    text = json.dumps(obj, indent=2)
    if dest == "-":
        print(text)
        return
    from .checkpoints import atomic_path

    with atomic_path(Path(dest), force=True) as tmp:
        tmp.write_text(text + "\n")
