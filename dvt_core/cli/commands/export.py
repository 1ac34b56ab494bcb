"""``dvt export``: one graph per stage (ONNX from torch, MindIR from MindSpore) plus the dvt.json manifest."""
from __future__ import annotations

from pathlib import Path

from dvt_core.model.zoo import get_spec
from dvt_core.errors import ArgumentError
from dvt_core.cli.commands._shared import escape_text, parse_overrides

HELP = "export one graph per stage (ONNX or MindIR) and a dvt.json manifest, for serving without dvt's model code"


def add_arguments(parser) -> None:
    from dvt_core.export.manifest import DEFAULT_OPSET, EXPORT_PRECISIONS, FORMATS, RESIZE_FORMS

    parser.add_argument("model", nargs="?", default=None,
                        help="zoo model name (see `dvt flops --list`); optional when --weights FILE names its "
                             "architecture (every checkpoint dvt writes does)")
    parser.add_argument("--weights", required=True,
                        help="checkpoint (.pth.tar, .pth, .safetensors, .ckpt) or 'default' (the shipped weights)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx (traced from the torch backend), pt2 (AOTInductor packages compiled from the torch "
                             "backend) or mindir (from the MindSpore backend)")
    parser.add_argument("--out", required=True, help="folder to write (graphs and dvt.json)")
    parser.add_argument("--force", action="store_true", help="replace an existing export folder")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--resize", default="auto", choices=RESIZE_FORMS,
                        help="onnx: the reuse resize as gather (Gather, Mul, ReduceSum over its taps), dense (one "
                             "MatMul) or auto (the form ONNX Runtime and OpenVINO run fastest; see docs/deploy.md)")
    parser.add_argument("--precision", default="fp32", choices=EXPORT_PRECISIONS,
                        help="onnx: what the weights are stored in (fp32 or fp16: half the size; the runtime "
                             "computes in the precision it is given); pt2: what the packages are compiled and run "
                             "in (fp32, bf16, fp16); mindir: fp32")
    parser.add_argument("--override", "-O", action="append", metavar="KEY=VALUE", help="spec override (repeatable)")


def run(args) -> int:
    from dvt_core.export.manifest import MANIFEST, SOURCE_BACKEND, graph_form
    from dvt_core.export.writer import check_target, export

    if args.model is not None:
        get_spec(args.model)  # an unknown name is reported first
    elif args.weights == "default":
        raise ArgumentError("--weights default needs the model name: dvt export MODEL --weights default ...")
    if args.weights != "default" and not Path(args.weights).exists():
        raise ArgumentError(f"weights file not found: {args.weights}")
    if args.model is None:
        from dvt_core.checkpoint.files import read_checkpoint

        meta = read_checkpoint(args.weights).meta or {}
        if not meta.get("spec") and not meta.get("arch"):
            raise ArgumentError(f"{args.weights} does not say which model it holds; name it: dvt export MODEL "
                            f"--weights {args.weights} ...")
    check_target(args.format, args.out, args.force, args.opset)  # format, opset, the folder and its parent
    graph_form(args.format, args.resize, args.precision)
    from dvt_core.runtime.builder import get_backend

    get_backend(SOURCE_BACKEND[args.format])
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise ArgumentError("exporting ONNX needs the onnx package; install it with: pip install 'dvt[onnx]'") from None
    out = export(args.model, weights=args.weights, fmt=args.format, out=args.out, force=args.force,
                 opset=args.opset, resize=args.resize, precision=args.precision, **parse_overrides(args.override))
    from dvt_core.data.datasets import model_name
    from dvt_core.export.manifest import read_manifest

    written = read_manifest(out, verify=False)
    name = escape_text(model_name(written.get("checkpoint_meta"), written["model"]))  # the weights' name
    print(f"wrote {out}/ ({name}, {args.format}: {MANIFEST} and one graph per stage); "
          f"run it with dvt_core.build({str(out)!r}, backend={args.format!r})")
    return 0
