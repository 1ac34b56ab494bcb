"""``dvt predict``: classify image files with early exit."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .. import data as dvt_data
from ._shared import (UserError, add_common_options, resolve_weights, build_from_args, _meta, _class_names,
                      exit_names, escape_text, _fmt_thresholds, _mmacs, parse_thresholds, choose_thresholds, _early_spec,
                      _check_budget)

HELP = "classify image files with early exit"


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files (PNG/JPEG) or folders of them")
    add_common_options(parser)
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--budget", type=float, default=None,
                   help="target average MACs per image: the most accurate operating point calibrated in the "
                        "checkpoint whose held-out average cost fits")
    g.add_argument("--thresholds", default=None, help="comma-separated confidence thresholds, one per exit")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")


def collect_images(inputs) -> list[str]:
    """Image files named, or found (PNG/JPEG, sorted, not recursive) in folders named; errors for the rest."""
    files = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise UserError(f"no such file or folder: {item}")
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir()
                           if f.is_file() and not f.name.startswith(".")
                           and f.name.lower().endswith(dvt_data.IMAGE_EXTENSIONS))
            if not found:
                raise UserError(f"folder {item} holds no PNG/JPEG images")
            files.extend(found)
        else:
            files.append(str(p))
    return files


def _load_images(files, spec) -> np.ndarray:
    if spec.in_chans not in (1, 3):
        raise UserError(f"{spec.name} takes {spec.in_chans}-channel images; image files give 1 (grey) or 3 (RGB)")
    return np.stack([dvt_data.load_image(f, spec.img_size, spec.in_chans) for f in files])


def run(args) -> int:
    from .. import evaluation

    files = collect_images(args.inputs)
    early = _early_spec(args)
    images = None
    if early is not None:  # the usual mistakes, before the model is built
        if args.thresholds:
            parse_thresholds(args.thresholds, early.num_exits)
        _check_budget(args.budget, early)
        images = _load_images(files, early)
    model = build_from_args(args, resolve_weights(args))
    spec, meta = model.spec, _meta(model)
    source = "the shipped weights" if args.weights in (None, "default") else str(args.weights)
    thresholds, how = choose_thresholds(args, spec, meta, source)
    if early is None or (early.img_size, early.in_chans) != (spec.img_size, spec.in_chans):
        images = _load_images(files, spec)
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
    return 0
