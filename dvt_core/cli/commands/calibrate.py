"""``dvt calibrate``: store the thresholds for a target average cost in a checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from dvt_core.data import sources as dvt_data
from dvt_core.model.zoo import get_spec
from dvt_core.data.datasets import is_fashion_mnist as _is_fashion_mnist, load_dataset, holdout_params
from dvt_core.cli.commands._shared import (UserError, parse_overrides, add_common_options, emit_json, _progress, _check_limit,
                      _is_shipped_file, build_from_args, _fmt_thresholds, _mmacs, match_folder_classes, _check_budget,
                      parse_budget, check_outputs)

HELP = "store the thresholds for a target average cost in a checkpoint"


def add_arguments(parser) -> None:
    add_common_options(parser)
    parser.add_argument("--budget", type=parse_budget, required=True,
                        help="target average MACs per image (5e6, 5M, 300K, 1.2G)")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--out", default=None, help="checkpoint to write (default: overwrite --weights)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                   help="calibrate on only the first N held-out images (quick runs; default: all)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--json", default=None, help="write the result as JSON here ('-' for stdout)")


def run(args) -> int:
    from dvt_core import fileio
    from dvt_core.runtime import evaluation
    from dvt_core.runtime import operating_point
    from dvt_core.checkpoint.files import format_for_suffix, read_checkpoint, write_checkpoint
    from dvt_core.errors import CheckpointError

    if args.weights is None:
        raise UserError("name the checkpoint to calibrate with --weights FILE "
                        "(or --weights default --model NAME --out FILE)")
    if args.weights == "default":
        if args.model is None:
            raise UserError("--weights default needs --model NAME")
        from dvt_core.checkpoint.registry import default_weights_path

        get_spec(args.model)
        src = default_weights_path(args.model)
        shipped = True
    else:
        src = Path(args.weights)
        if not src.exists():
            raise UserError(f"weights file not found: {src}")
        shipped = _is_shipped_file(src)
    if args.out is None and shipped:
        raise UserError(f"refusing to modify the shipped weights {src} (their SHA-256 is registered); "
                        "write a calibrated copy with --out FILE")
    dst = Path(args.out) if args.out is not None else src
    if args.out is not None:
        if dst.exists() and dst.resolve() != src.resolve() and not args.force:
            raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
        if _is_shipped_file(dst):
            raise UserError(f"refusing to overwrite the shipped weights {dst}; choose another --out")
        try:
            fmt = format_for_suffix(dst)
        except CheckpointError:
            raise UserError(f"cannot tell the format of {dst} from its suffix; use .safetensors, .pth or .ckpt") \
                from None
    fileio.check_writable(dst, force=True)  # in place or a new --out: its folder must exist and be writable
    check_outputs(args, args.json)
    limit = _check_limit(args.limit, "--limit")
    if not np.isfinite(args.budget) or args.budget <= 0:
        raise UserError(f"--budget must be a positive number of MACs, got {args.budget:g}")

    from dvt_core.runtime.builder import resolve_spec

    ckpt = read_checkpoint(src)
    if args.out is None:
        fmt = "torch" if ckpt.format == "official" else ckpt.format
    early = resolve_spec(args.model, ckpt, **parse_overrides(args.override))  # checks before building
    if early.num_exits < 2:
        raise UserError(f"{early.name} has a single exit: there are no thresholds to calibrate")
    _check_budget(args.budget, early)
    model = build_from_args(args, weights=str(src))
    spec = model.spec

    fashion = _is_fashion_mnist(args.dataset)
    hold_size, hold_seed = holdout_params(ckpt.meta)
    if fashion:
        images, labels, _ = load_dataset(args.dataset, "holdout", spec, hold_size, hold_seed)
        data_desc = {"dataset": "fashion-mnist", "split": "holdout", "holdout": hold_size, "seed": hold_seed}
    else:
        images, labels, folder_classes = load_dataset(args.dataset, "all", spec)
        labels, _ = match_folder_classes(labels, folder_classes, ckpt.meta, spec)
        data_desc = {"dataset": str(args.dataset), "split": "all"}
        trained_on = (ckpt.meta or {}).get("dataset_images")
        if trained_on == len(labels) and hold_size:  # the folder it was trained on: only its held-out part
            _, hold = dvt_data.split_holdout(len(labels), hold_size, hold_seed)
            images, labels = images[hold], labels[hold]
            data_desc.update(split="holdout", holdout=hold_size, seed=hold_seed)
        elif trained_on is not None:
            print(f"note: {args.dataset} holds {len(labels)} images, not the {trained_on} the model was trained "
                  "on; calibrating on all of them", file=sys.stderr)
    if limit:
        images, labels = images[:limit], labels[:limit]
        data_desc["limit"] = limit
    if len(labels) == 0:
        raise UserError(f"no calibration images: the held-out part of {args.dataset} is empty "
                        f"(the checkpoint was trained with holdout {hold_size})")
    if labels.max() >= spec.num_classes:
        raise UserError(f"{args.dataset} has {labels.max() + 1} classes but {spec.name} predicts {spec.num_classes}")
    probs = evaluation.exit_probs(model, images, progress=_progress(), desc=f"{spec.name} calibration")
    found = operating_point.calibrate(probs, labels, spec, args.budget)
    thresholds, chosen = found["thresholds"], {**found["calibration"], **data_desc}
    shares = chosen["exit_shares"]
    meta = operating_point.calibrated_meta(ckpt.meta, spec, thresholds, chosen, found["budgets"],
                                           holdout_anytime_accuracy=found["holdout_anytime_accuracy"])
    write_checkpoint(dst, ckpt.canonical_state(spec.num_exits, spec.in_chans), meta, fmt=fmt, force=True)

    how = (f"budget index {chosen['budget_index']}" if "budget_index" in chosen else chosen["policy"])
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"{spec.name}: target {_mmacs(args.budget)} MACs -> {how}: thresholds {_fmt_thresholds(thresholds)}",
          file=out)
    print(f"on {len(labels)} calibration images: {chosen['holdout_accuracy']:.2f}% at "
          f"{_mmacs(chosen['holdout_macs'])} MACs on average; exits taken "
          f"{' / '.join(f'{s:.0%}' for s in shares)}", file=out)
    print(f"wrote {dst}", file=out)
    emit_json({"model": spec.name, "weights": str(dst), "thresholds": meta["thresholds"], **chosen}, args.json,
              force=args.force)
    return 0
