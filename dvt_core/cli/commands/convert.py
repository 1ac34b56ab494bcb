"""``dvt convert``: checkpoints between the official releases, torch, safetensors and MindSpore.

A ``.ckpt`` of the authors' MindSpore code is recognised from its names; ``--to mindspore-official`` writes
that layout back (their names and order, no metadata).
"""
from __future__ import annotations

from pathlib import Path

from dvt_core.checkpoint.files import WRITE_FORMATS
from dvt_core.cli.commands._shared import (check_outputs, parse_overrides)
from dvt_core.errors import ArgumentError

HELP = "convert a checkpoint between the official releases, torch, safetensors and MindSpore"


def add_arguments(parser) -> None:
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--arch", default=None, help="model name (needed when SRC carries no architecture)")
    parser.add_argument("--to", default=None, choices=list(WRITE_FORMATS),
                        help="output format (default: from DST's suffix; mindspore-official: the layout of the "
                             "authors' MindSpore code)")
    parser.add_argument("--force", action="store_true", help="overwrite DST")
    parser.add_argument("--override", "-O", action="append", metavar="KEY=VALUE")


def run(args) -> int:
    from dvt_core.checkpoint.files import format_for_suffix
    from dvt_core.checkpoint.convert import convert
    from dvt_core.errors import CheckpointError

    if args.to is None:
        try:
            format_for_suffix(args.dst)
        except CheckpointError:
            raise ArgumentError(f"cannot tell the output format from {args.dst}'s suffix; name it .safetensors, .pth "
                            f"or .ckpt, or pass --to {'|'.join(WRITE_FORMATS)}") from None
    if not Path(args.src).exists():
        raise ArgumentError(f"checkpoint not found: {args.src}")
    check_outputs(args, args.dst)  # before reading SRC: DST's folder must exist (it is not created)
    out = convert(args.src, args.dst, arch=args.arch, to=args.to, force=args.force,
                  overrides=parse_overrides(args.override))
    print(f"wrote {out['path']} ({out['format']}, {out['tensors']} tensors, arch {out['arch']})")
    return 0
