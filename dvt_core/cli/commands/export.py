"""``dvt export``: one graph per stage (ONNX from torch, MindIR from MindSpore) plus the dvt.json manifest."""
from __future__ import annotations

from pathlib import Path

from dvt_core.model.zoo import get_spec
from dvt_core.cli.commands._shared import UserError, parse_overrides

HELP = "export one graph per stage (ONNX or MindIR) and a dvt.json manifest, for serving without dvt's model code"


def add_arguments(parser) -> None:
    from dvt_core.export.writer import DEFAULT_OPSET, FORMATS

    parser.add_argument("model", nargs="?", default=None,
                        help="zoo model name (see `dvt flops --list`); optional when --weights FILE names its "
                             "architecture (every checkpoint dvt writes does)")
    parser.add_argument("--weights", required=True,
                        help="checkpoint (.pth.tar, .pth, .safetensors, .ckpt) or 'default' (the shipped weights)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx (traced from the torch backend) or mindir (from the MindSpore backend)")
    parser.add_argument("--out", required=True, help="folder to write (graphs and dvt.json)")
    parser.add_argument("--force", action="store_true", help="replace an existing export folder")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--override", "-O", action="append", metavar="KEY=VALUE", help="spec override (repeatable)")


def run(args) -> int:
    from dvt_core.export.writer import MANIFEST, SOURCE_BACKEND, check_target, export

    if args.model is not None:
        get_spec(args.model)  # an unknown name is reported first
    elif args.weights == "default":
        raise UserError("--weights default needs the model name: dvt export MODEL --weights default ...")
    if args.weights != "default" and not Path(args.weights).exists():
        raise UserError(f"weights file not found: {args.weights}")
    if args.model is None:
        from dvt_core.checkpoint.files import read_checkpoint

        meta = read_checkpoint(args.weights).meta or {}
        if not meta.get("spec") and not meta.get("arch"):
            raise UserError(f"{args.weights} does not say which model it holds; name it: dvt export MODEL "
                            f"--weights {args.weights} ...")
    if args.format == "onnx" and not 7 <= args.opset <= 21:
        raise UserError(f"--opset {args.opset} is outside what the torch exporter writes (7..21)")
    check_target(args.format, args.out, args.force)
    from dvt_core.runtime.builder import get_backend

    get_backend(SOURCE_BACKEND[args.format])
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UserError("exporting ONNX needs the onnx package; install it with: pip install 'dvt[onnx]'") from None
    out = export(args.model, weights=args.weights, fmt=args.format, out=args.out, force=args.force,
                 opset=args.opset, **parse_overrides(args.override))
    print(f"wrote {out}/ ({args.format}: {MANIFEST} and one graph per stage); "
          f"run it with dvt_core.build({str(out)!r}, backend={args.format!r})")
    return 0
