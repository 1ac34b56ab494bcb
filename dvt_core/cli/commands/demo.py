"""``dvt demo``: the shipped Fashion-MNIST DVT on sample images."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np

from dvt_core.data import sources as dvt_data
from dvt_core.errors import ArgumentError, DVTError
from dvt_core.model.zoo import get_spec
from dvt_core.cli.commands._shared import (add_force_option, check_outputs, check_picture, plots_available, add_common_options, emit_json,
                      show_progress, build_from_args, model_meta, model_class_names, exit_names, format_thresholds, format_mmacs, print_table,
                      choose_thresholds, exit_macs, parse_budget)

HELP = "the shipped Fashion-MNIST DVT on sample images"
DEFAULT_PICTURE = "dvt_demo.png"


def add_arguments(parser) -> None:
    add_common_options(parser, model=False, weights=False)
    parser.add_argument("--weights", default=None,
                        help="with --backend onnx|mindir: the `dvt export` folder of the shipped DVT")
    parser.add_argument("--out", default=DEFAULT_PICTURE,
                        help="where to write the picture (.png, .jpg, .pdf, .svg); without matplotlib installed, "
                             "dvt_demo.png is skipped with a note")
    parser.add_argument("--full", action="store_true", help="use the whole installed test set, not the samples")
    parser.add_argument("--budget", type=parse_budget, default=None,
                        help="target average MACs per image (5e6, 5M, 300K, 1.2G)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file ('-' for stdout)")
    parser.add_argument("--limit", type=int, default=None, help="rows of the per-image table to print")
    add_force_option(parser)


DEMO_MODEL = "dvt_fashion_mnist"
DEMO_STATIC = "static_fashion_mnist_7x7"
DEMO_SAMPLES = 48
SUBSET_FILE = Path(__file__).resolve().parents[2] / "assets" / "fashion_mnist_test_subset.npz"


def demo_samples(n: int = DEMO_SAMPLES):
    """The first ``n`` images, in test-set order, of the 1,000-image test subset shipped with dvt:
    (uint8 images, labels, test-set indices)."""
    if not SUBSET_FILE.exists():
        raise ArgumentError(f"the demo images are missing ({SUBSET_FILE}); reinstall dvt, or run `dvt demo --full`")
    with np.load(SUBSET_FILE) as d:
        order = np.argsort(d["indices"], kind="stable")[:n]
        return d["images"][order], d["labels"][order].astype(np.int64), d["indices"][order].astype(np.int64)


def _reference_numbers() -> Optional[str]:
    """Full-test-set numbers stored in the shipped weights' metadata (None when unavailable)."""
    from dvt_core.checkpoint.files import read_checkpoint
    from dvt_core.checkpoint.registry import default_weights_path

    try:
        dvt = read_checkpoint(default_weights_path(DEMO_MODEL, verify=False)).meta
        static = read_checkpoint(default_weights_path(DEMO_STATIC, verify=False)).meta
        op = dvt["default_operating_point"]
        s_acc = static["test_anytime_accuracy"][-1]
        s_macs = exit_macs(get_spec(DEMO_STATIC))[-1]
        return (f"on the full test set (10,000 images, from the weights' metadata): DVT at its default thresholds "
                f"{op['test_accuracy']:.2f}% "
                f"at {format_mmacs(op['test_macs'])} MACs, {DEMO_STATIC} {s_acc:.2f}% at {format_mmacs(s_macs)} MACs")
    except (DVTError, KeyError, IndexError, TypeError, OSError):
        return None


def _check_args(args) -> bool:
    """Every option checked before any work; True when the demo runs an export folder."""
    if args.limit is not None and args.limit < 0:
        raise ArgumentError(f"--limit must be 0 or more, got {args.limit}")
    if args.out == DEFAULT_PICTURE and not plots_available():
        print(f"note: no picture ({DEFAULT_PICTURE}): matplotlib is not installed (pip install 'dvt[plots]')",
              file=sys.stderr)
        args.out = None
    check_outputs(args, args.out, args.json)
    check_picture(args.out)
    from dvt_core.runtime.contract import get_backend, runtime_names

    exported = args.backend in runtime_names("export")
    if exported and args.weights is None:
        fmt = get_backend(args.backend).graph_format  # the graphs it reads (OpenVINO reads the ONNX export)
        raise ArgumentError(f"--backend {args.backend} runs an export: pass --weights DIR "
                        f"(make it with `dvt export {DEMO_MODEL} --weights default --format {fmt} --out DIR`)")
    if not exported and args.weights is not None:
        raise ArgumentError("the demo runs the shipped weights; --weights is for --backend onnx|mindir (an export folder)")
    return exported


def _model_and_images(args, exported: bool):
    """(model, images, labels, their indices in the test set, a phrase saying what they are)."""
    from types import SimpleNamespace

    ns = SimpleNamespace(model=DEMO_MODEL, weights=args.weights if exported else "default", override=None,
                         backend=args.backend, device=args.device, precision=args.precision)
    model = build_from_args(ns)
    if args.full:
        images, labels = dvt_data.load_fashion_mnist("test")
        index = np.arange(len(labels))
        what = f"the whole Fashion-MNIST test set ({len(labels)} images)"
    else:
        images, labels, index = demo_samples()
        what = (f"{len(labels)} sample test images shipped with dvt (run `dvt demo --full` for the whole "
                "Fashion-MNIST test set)")
    return model, images, labels, index, what


def run(args) -> int:
    from dvt_core.runtime import evaluation

    exported = _check_args(args)
    model, images, labels, index, what = _model_and_images(args, exported)
    spec, meta = model.spec, model_meta(model)
    thresholds, how = choose_thresholds(args, spec, meta, "the shipped weights")
    res = evaluation.adaptive(model, images, thresholds, progress=show_progress())
    classes = model_class_names(meta, spec.num_classes) or list(dvt_data.FASHION_MNIST_CLASSES)
    names = exit_names(spec)
    n = len(labels)
    correct = res.prediction == labels
    accuracy = float(correct.mean() * 100)
    mean_macs = res.mean_macs
    static_macs = exit_macs(get_spec(DEMO_STATIC))[-1]
    shares = res.exit_counts / n

    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"{DEMO_MODEL} ({args.backend}, {'export of the ' if exported else ''}shipped weights) on {what}", file=out)
    print(f"thresholds {format_thresholds(thresholds)} ({how})", file=out)
    rows_limit = args.limit if args.limit is not None else (n if not args.full else DEMO_SAMPLES)
    if rows_limit:
        rows = [[str(int(index[i])), classes[int(res.prediction[i])], classes[int(labels[i])],
                 names[int(res.exit_index[i])], f"{float(res.confidence[i]):.1%}", format_mmacs(int(res.macs[i])),
                 "" if correct[i] else "wrong"] for i in range(min(rows_limit, n))]
        print(file=out)
        print_table(["idx", "prediction", "true label", "exit taken", "confidence", "MACs", ""], rows, out,
               right=[1, 2, 3, 6])
        if rows_limit < n:
            print(f"... {n - rows_limit} more images (--limit N shows more rows)", file=out)
    print(file=out)
    print(f"accuracy: {accuracy:.2f}% ({int(correct.sum())}/{n})", file=out)
    print(f"average MACs per image: {format_mmacs(mean_macs)} vs {format_mmacs(static_macs)} for the static full-grid model "
          f"{DEMO_STATIC} ({mean_macs / static_macs:.2f}x, {static_macs / mean_macs:.2f}x fewer)", file=out)
    print("exits taken: " + ", ".join(f"{names[k]} {shares[k]:.0%} ({int(res.exit_counts[k])})"
                                      for k in range(spec.num_exits)), file=out)
    ref = _reference_numbers()
    if ref:
        print(ref, file=out)

    _write_outputs(args, images, index, labels, res, classes, names, thresholds, accuracy, static_macs, out)
    return 0


def _write_outputs(args, images, index, labels, res, classes, names, thresholds, accuracy, static_macs, out) -> None:
    """The exit gallery (--out) and the JSON record (--json)."""
    n, mean_macs, shares = len(labels), res.mean_macs, res.exit_counts / len(labels)
    pred_names = [classes[int(p)] for p in res.prediction]
    true_names = [classes[int(y)] for y in labels]
    if args.out:
        from dvt_core.cli.plots import exit_gallery

        exit_gallery(args.out, images, res.exit_index, pred_names, true_names, names, force=args.force,
                     title=f"{DEMO_MODEL}: {n} test images by exit taken ({accuracy:.1f}% correct, "
                           f"{format_mmacs(mean_macs)} MACs on average vs {format_mmacs(static_macs)} static)\n"
                           "a row shows at most 12 images of its exit: wrong predictions (red, x) first")
        print(f"wrote {args.out}", file=out)
    emit_json({"model": DEMO_MODEL, "backend": args.backend, "images": n, "full": bool(args.full),
               "thresholds": [float(t) for t in thresholds], "accuracy": accuracy, "mean_macs": mean_macs,
               "static_model": DEMO_STATIC, "static_macs": static_macs, "macs_ratio": mean_macs / static_macs,
               "exit_names": names, "exit_counts": [int(c) for c in res.exit_counts],
               "exit_shares": [float(s) for s in shares],
               "per_image": [{"index": int(index[i]), "prediction": pred_names[i], "label": true_names[i],
                              "exit": int(res.exit_index[i]) + 1, "confidence": float(res.confidence[i]),
                              "macs": int(res.macs[i])} for i in range(n)]}, args.json, force=args.force)
    if args.json not in (None, "-"):
        print(f"wrote {args.json}", file=out)
