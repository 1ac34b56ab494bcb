"""``dvt predict``: classify image files with early exit."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dvt_core.cli.commands._shared import (UserError, add_common_options, resolve_weights, build_from_args, _meta, _class_names,
                      exit_names, escape_text, _fmt_thresholds, _mmacs, parse_thresholds, choose_thresholds,
                      _early_spec, _check_budget, parse_budget)

HELP = "classify image files with early exit"


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files or folders of them (sub-folders included)")
    add_common_options(parser)
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--budget", type=parse_budget, default=None,
                   help="target average MACs per image (5e6, 5M, 300K): the most accurate operating point "
                        "calibrated in the checkpoint whose held-out average cost fits")
    g.add_argument("--thresholds", default=None, help="comma-separated confidence thresholds, one per exit")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")


def collect_images(inputs) -> list[str]:
    """Image files named, and those found in folders named and their sub-folders (sorted; hidden
    files and folders skipped); an error for a path that does not exist or a folder without images."""
    from dvt_core.data.images import IMAGE_EXTENSIONS, find_images

    files = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise UserError(f"no such file or folder: {item}")
        if p.is_dir():
            found = find_images(p, recursive=True)
            if not found:
                raise UserError(f"folder {item} holds no image files ({', '.join(IMAGE_EXTENSIONS)}; "
                                "sub-folders included)")
            files.extend(found)
        else:
            files.append(str(p))
    return files


def _load_images(files, spec) -> tuple[list, np.ndarray, list]:
    """(files read, their uint8 batch, one 'path: reason' line per file that could not be read)."""
    from dvt_core.data.images import ImageReadError, read_image

    if spec.in_chans not in (1, 3):
        raise UserError(f"{spec.name} takes {spec.in_chans}-channel images; image files give 1 (grey) or 3 (RGB)")
    read, images, failed = [], [], []
    for f in files:
        try:
            images.append(read_image(f, spec.img_size, spec.in_chans))
            read.append(f)
        except (ImageReadError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            failed.append(reason if reason.startswith(f) else f"{f}: {reason}")
    return read, (np.stack(images) if images else None), failed


def run(args) -> int:
    from dvt_core.runtime import evaluation

    files = collect_images(args.inputs)
    early = _early_spec(args)
    loaded = None
    if early is not None:  # the usual mistakes, before the model is built
        if args.thresholds is not None:
            parse_thresholds(args.thresholds, early.num_exits)
        _check_budget(args.budget, early)
        loaded = _load_images(files, early)
    model = build_from_args(args, resolve_weights(args))
    spec, meta = model.spec, _meta(model)
    source = "the shipped weights" if args.weights in (None, "default") else str(args.weights)
    thresholds, how = choose_thresholds(args, spec, meta, source)
    if early is None or (early.img_size, early.in_chans) != (spec.img_size, spec.in_chans):
        loaded = _load_images(files, spec)
    files, images, failed = loaded
    if images is None:  # nothing done: a user error (status 2, one line), not a partial failure
        raise UserError(f"none of the {len(failed)} image(s) could be read (first: {escape_text(failed[0])})")
    for line in failed:  # reported and skipped; the status says so at the end
        print(f"dvt predict: skipped {escape_text(line)}", file=sys.stderr)
    res = evaluation.adaptive(model, images, thresholds)
    classes = _class_names(meta, spec.num_classes)
    names = exit_names(spec)
    if not args.json:
        print(f"# {spec.name} ({args.backend}), thresholds {_fmt_thresholds(thresholds)} ({how})", file=sys.stderr)
    shown = [escape_text(f) for f in files]
    width = max(len(f) for f in shown)
    for i, f in enumerate(files):
        k = int(res.exit_index[i])
        pred = int(res.prediction[i])
        label = classes[pred] if classes else str(pred)
        text_label = escape_text(label)
        if args.json:
            print(json.dumps({"path": f, "prediction": label, "class_index": pred,
                              "confidence": round(float(res.confidence[i]), 6), "exit": k + 1,
                              "exits": spec.num_exits, "grid": spec.stages[k].grid, "macs": int(res.macs[i])}))
        else:
            print(f"{shown[i].ljust(width)}  {text_label:<12}  {float(res.confidence[i]):6.1%}  {names[k]}  "
                  f"{_mmacs(int(res.macs[i]))} MACs")
    if failed:
        print(f"dvt predict: {len(failed)} of {len(failed) + len(files)} image(s) could not be read (skipped)",
              file=sys.stderr)
        return 1
    return 0
