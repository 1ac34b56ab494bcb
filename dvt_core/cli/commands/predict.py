"""``dvt predict``: classify image files with early exit."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from dvt_core.data.datasets import model_name, trained_on_fashion_mnist
from dvt_core.errors import ArgumentError
from dvt_core.runtime import evaluation
from dvt_core.cli.commands._shared import (add_common_options, resolve_weights, build_from_args, model_meta, model_class_names,
                      exit_names, escape_text, format_thresholds, format_mmacs, parse_thresholds, choose_thresholds,
                      early_spec, check_budget_option, parse_budget, latency_thresholds, parse_latency)

HELP = "classify image files with early exit"

DOMAIN_NOTE = ("{name} was trained on Fashion-MNIST: it expects 28x28 grey product silhouettes, white on a black "
               "background; a confident early exit is no guard against inputs unlike its training images")


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="*",
                        help="image files or folders of them (sub-folders included); '-' reads one path per line "
                             "from stdin")
    parser.add_argument("--files-from", default=None, metavar="FILE",
                        help="also classify the paths listed in FILE, one per line ('-': stdin)")
    add_common_options(parser)
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--budget", type=parse_budget, default=None,
                   help="target average MACs per image (5e6, 5M, 300K; a value dvt printed, rounded, stands for "
                        "the exit it names): the most accurate operating point calibrated in the checkpoint whose "
                        "held-out average cost fits (default: the checkpoint's default thresholds)")
    g.add_argument("--latency-budget", type=parse_latency, default=None, metavar="TIME",
                   help="target time per image (0.4ms, 400us): the most accurate calibrated operating point expected "
                        "to meet it under the cost profile `dvt profile` stored for this runtime, precision and "
                        "--batch-size")
    g.add_argument("--thresholds", default=None,
                   help="comma-separated confidence thresholds, one per exit but the last (default: the "
                        "checkpoint's)")
    parser.add_argument("--top-k", type=int, default=1, metavar="K", help="classes to show per image, most likely first")
    parser.add_argument("--batch-size", type=int, default=64, help="images read and classified at a time")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads the model runs with (default: the framework's own choice)")
    parser.add_argument("--json", action="store_true",
                        help="JSON Lines on stdout: one JSON object per image and line (path, prediction, "
                             "class_index, confidence, exit (1-based), exits, grid, macs, exit_confidences: one "
                             "per exit, null where the image did not go, top_k), then the summary on stderr")
    parser.add_argument("--quiet", "-q", action="store_true", help="no header, note or summary on stderr")


def _read_list(source) -> list[str]:
    """Paths, one per line, from a file or stdin ('-'); blank lines skipped."""
    if source == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ArgumentError(f"--files-from {source}: cannot read it ({exc})") from None
    return [line.rstrip("\r\n") for line in text.splitlines() if line.strip()]


def input_paths(args) -> list[tuple[str, bool]]:
    """(path, whether a list named it) for the positional inputs, '-' and --files-from, in order."""
    items = []
    for item in args.inputs:
        items.extend([(p, True) for p in _read_list("-")] if item == "-" else [(item, False)])
    if args.files_from is not None:
        items.extend((p, True) for p in _read_list(args.files_from))
    if not items:
        raise ArgumentError("name image files or folders, '-' to read paths from stdin, or --files-from FILE")
    return items


def collect_images(inputs) -> tuple[list[str], list[str]]:
    """(image files named, and those found in folders named and their sub-folders (sorted; hidden files and folders
    skipped); one 'path: reason' line per listed path that does not exist). A missing path typed on the command
    line or a folder without images is an error; one missing path among a list's thousands is skipped like an
    unreadable image."""
    from dvt_core.data.images import IMAGE_EXTENSIONS, find_images

    files, missing = [], []
    for item, listed in inputs:
        p = Path(item)
        if not p.exists() and listed:
            missing.append(f"{item}: no such file")
            continue
        if not p.exists():
            raise ArgumentError(f"no such file or folder: {item}")
        if p.is_dir():
            found = find_images(p, recursive=True)
            if not found:
                raise ArgumentError(f"folder {item} holds no image files ({', '.join(IMAGE_EXTENSIONS)}; "
                                "sub-folders included)")
            files.extend(found)
        else:
            files.append(str(p))
    if not files:
        raise ArgumentError(f"none of the {len(missing)} listed path(s) exists (first: {escape_text(missing[0])})")
    return files, missing


def _load_images(files, spec) -> tuple[list, np.ndarray, list]:
    """(files read, their uint8 batch, one 'path: reason' line per file that could not be read)."""
    from dvt_core.data.images import ImageReadError, read_image

    if spec.in_chans not in (1, 3):
        raise ArgumentError(f"{spec.name} takes {spec.in_chans}-channel images; image files give 1 (grey) or 3 (RGB)")
    read, images, failed = [], [], []
    for f in files:
        try:
            images.append(read_image(f, spec.img_size, spec.in_chans))
            read.append(f)
        except (ImageReadError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            failed.append(reason if reason.startswith(f) else f"{f}: {reason}")
    return read, (np.stack(images) if images else None), failed


def set_threads(model, backend: str, threads) -> None:
    """--threads: the framework's intra-op threads (torch), or the export runtime's sessions."""
    if threads is None:
        return
    if threads < 1:
        raise ArgumentError(f"--threads must be at least 1, got {threads}")
    from dvt_core.runtime.contract import backend_of

    backend_of(model).set_threads(model, threads)


def _top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from dvt_core.runtime.policy import softmax

    p = softmax(logits.astype(np.float64))
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(p, order, axis=1)


def _emit(args, spec, classes, names, files, res, width) -> None:
    """One line (text or JSON) per image of a classified chunk."""
    label_of = (lambda c: classes[c]) if classes else str
    order, probs = _top_k(res.logits, args.top_k)
    for i, f in enumerate(files):
        k, pred = int(res.exit_index[i]), int(res.prediction[i])
        if args.json:
            reached = res.exit_confidences[i] if res.exit_confidences is not None else [np.nan] * spec.num_exits
            print(json.dumps({
                "path": f, "prediction": label_of(pred), "label": label_of(pred), "class_index": pred,
                "confidence": round(float(res.confidence[i]), 6), "exit": k + 1, "exits": spec.num_exits,
                "grid": spec.stages[k].grid, "macs": int(res.macs[i]),
                "exit_confidences": [None if c != c else round(float(c), 6) for c in reached],
                "top_k": [{"prediction": label_of(int(c)), "label": label_of(int(c)), "class_index": int(c),
                           "probability": round(float(p), 6)}
                          for c, p in zip(order[i], probs[i])]}))
            continue
        line = f"{escape_text(f).ljust(width)}  {escape_text(label_of(pred)):<12}  {float(res.confidence[i]):6.1%}  " \
               f"{names[k]}  {format_mmacs(int(res.macs[i]))} MACs"
        if args.top_k > 1:  # all k, the prediction first: "top 3:" names three classes
            line += f"  top {args.top_k}: " + ", ".join(f"{escape_text(label_of(int(c)))} {float(p):.1%}"
                                                       for c, p in zip(order[i], probs[i]))
        print(line, flush=False)


def _check_counts(args) -> None:
    for option, value in (("--batch-size", args.batch_size), ("--top-k", args.top_k)):
        if value < 1:
            raise ArgumentError(f"{option} must be at least 1, got {value}")


def run(args) -> int:
    _check_counts(args)
    files, missing = collect_images(input_paths(args))
    early = early_spec(args)
    if early is not None:  # the usual mistakes, before the model is built
        if args.thresholds is not None:
            parse_thresholds(args.thresholds, early.num_exits)
        check_budget_option(args.budget, early)
    model = build_from_args(args, resolve_weights(args))
    set_threads(model, args.backend, args.threads)
    spec, meta = model.spec, model_meta(model)
    args.top_k = min(args.top_k, spec.num_classes)
    source = "the shipped weights" if args.weights in (None, "default") else str(args.weights)
    if args.latency_budget is not None:
        thresholds, how = latency_thresholds(args, spec, meta, source, args.batch_size)
    else:
        thresholds, how = choose_thresholds(args, spec, meta, source)
    classes = model_class_names(meta, spec.num_classes)
    names = exit_names(spec)
    # the header goes out with the first answers: a run that fails before any (nothing readable, NaN
    # logits) is one error line and nothing else
    header = not args.json and not args.quiet
    width = max(len(escape_text(f)) for f in files)
    t0, done, failed, reported = time.perf_counter(), 0, list(missing), 0
    counts, macs = np.zeros(spec.num_exits, np.int64), 0
    for start in range(0, len(files), args.batch_size):  # read, classify and print a chunk at a time
        read, images, bad = _load_images(files[start:start + args.batch_size], spec)
        failed.extend(bad)
        if images is None:
            continue
        for line in failed[reported:]:  # reported and skipped once something was read; the status says so
            print(f"dvt predict: skipped {escape_text(line)}", file=sys.stderr)
        reported = len(failed)
        res = evaluation.adaptive(model, images, thresholds, batch_size=args.batch_size)
        if header:
            name = escape_text(model_name(meta, spec.name))  # the weights' name, not their architecture's
            print(f"# {name} ({args.backend}), thresholds {format_thresholds(thresholds)} ({how})", file=sys.stderr)
            if trained_on_fashion_mnist(meta):
                print(f"# note: {DOMAIN_NOTE.format(name=name)}", file=sys.stderr)
            header = False
        _emit(args, spec, classes, names, read, res, width)
        sys.stdout.flush()
        done += len(read)
        counts += res.exit_counts
        macs += int(res.macs.sum())
    seconds = time.perf_counter() - t0
    if done == 0:  # nothing done: a user error (status 2, one line), not a partial failure
        raise ArgumentError(f"none of the {len(failed)} image(s) could be read (first: {escape_text(failed[0])})")
    for line in failed[reported:]:
        print(f"dvt predict: skipped {escape_text(line)}", file=sys.stderr)
    if not args.quiet:
        shares = ", ".join(f"exit {k + 1}: {int(c)}" for k, c in enumerate(counts))
        print(f"# {done} image(s) in {seconds:.2f} s ({done / max(seconds, 1e-9):.1f} images/s); {shares}; "
              f"{format_mmacs(macs / done)} MACs per image on average", file=sys.stderr)
    if failed:
        print(f"dvt predict: {len(failed)} of {len(failed) + done} image(s) could not be read (skipped)",
              file=sys.stderr)
        return 1
    return 0
