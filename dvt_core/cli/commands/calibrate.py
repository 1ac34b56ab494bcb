"""``dvt calibrate``: store the thresholds for a target average cost in a checkpoint or an export folder."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from dvt_core.model.zoo import get_spec
from dvt_core.cli.commands._shared import (parse_overrides, add_common_options, emit_json, show_progress, check_limit,
                      is_shipped_file, build_from_args, format_thresholds, format_mmacs, check_budget_option,
                      parse_budget, check_outputs, latency_costs, parse_latency)
from dvt_core.data.datasets import calibration_set
from dvt_core.errors import ArgumentError
from dvt_core.runtime import evaluation, operating_point
from dvt_core.training.loop import FEW_HOLDOUT

HELP = "store the thresholds for a target average cost in a checkpoint or a `dvt export` folder"


def add_arguments(parser) -> None:
    add_common_options(parser)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--budget", type=parse_budget,
                        help="target average MACs per image (5e6, 5M, 300K, 1.2G; a value printed by dvt, "
                             "rounded, is accepted for the exit it names)")
    target.add_argument("--latency-budget", type=parse_latency, default=None, metavar="TIME",
                        help="target time per image (0.4ms, 400us) under the cost profile `dvt profile` stored for "
                             "this runtime and precision: the most accurate operating point expected to meet it")
    parser.add_argument("--profile-batch", type=int, default=1, metavar="B",
                        help="with --latency-budget: the measured batch size whose times apply (default 1)")
    parser.add_argument("--dataset", default=None,
                        help="fashion-mnist or a folder with one sub-folder per class (default: the held-out "
                             "part of the data set the checkpoint was trained on, else Fashion-MNIST's)")
    parser.add_argument("--out", default=None, help="checkpoint to write (default: rewrite --weights in place, "
                                                     "which needs --force; an export folder's dvt.json is always "
                                                     "rewritten in place)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                   help="calibrate on only the first N held-out images (quick runs; default: all)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing --out, or without --out rewrite --weights in place (atomically)")
    parser.add_argument("--json", default=None, help="write the result as JSON here ('-' for stdout)")


def _source(args):
    """(checkpoint or export path, is it shipped, is it an export folder)."""
    from dvt_core.export.writer import is_export

    if args.weights is None:
        raise ArgumentError("name the checkpoint to calibrate with --weights FILE (or an export folder, --weights DIR; "
                        "or --weights default --model NAME --out FILE)")
    if args.weights == "default":
        if args.model is None:
            raise ArgumentError("--weights default needs --model NAME")
        from dvt_core.checkpoint.registry import default_weights_path

        get_spec(args.model)
        return default_weights_path(args.model), True, False
    src = Path(args.weights)
    if not src.exists():
        raise ArgumentError(f"weights file not found: {src}")
    if is_export(src):
        return src, False, True
    if src.is_dir():
        raise ArgumentError(f"{src} is a folder but not a dvt export (no dvt.json)")
    return src, is_shipped_file(src), False


def _target(args, src, shipped: bool, exported: bool):
    """(file to write, its checkpoint format or None for an export), checked before any work."""
    from dvt_core import fileio
    from dvt_core.checkpoint.files import format_for_suffix
    from dvt_core.errors import CheckpointError

    if exported:
        if args.out is not None:
            raise ArgumentError("an export folder is recalibrated in place (its dvt.json); drop --out, or copy the "
                            "folder first")
        fileio.check_writable(src / "dvt.json", force=True)
        return src, None
    if args.out is None and shipped:
        raise ArgumentError(f"refusing to modify the shipped weights {src} (their SHA-256 is registered); "
                        "write a calibrated copy with --out FILE")
    if args.out is None and not args.force:  # it may be the user's only copy of a long training run
        raise ArgumentError(f"refusing to rewrite {src} in place: write the calibrated copy with --out FILE, or pass "
                        "--force to replace it")
    dst = Path(args.out) if args.out is not None else src
    fmt = None
    if args.out is not None:
        if dst.exists() and dst.resolve() != src.resolve() and not args.force:
            raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
        if is_shipped_file(dst):
            raise ArgumentError(f"refusing to overwrite the shipped weights {dst}; choose another --out")
        try:
            fmt = format_for_suffix(dst)
        except CheckpointError:
            raise ArgumentError(f"cannot tell the format of {dst} from its suffix; use .safetensors, .pth or .ckpt") \
                from None
    fileio.check_writable(dst, force=True)  # in place or a new --out: its folder must exist and be writable
    return dst, fmt


def _read_source(args, src, exported: bool, fmt):
    """(spec, metadata, checkpoint or None, output format) of what is calibrated, checked before any model
    is built; an export runs on its own runtime unless --backend names another."""
    if exported:
        from dvt_core.export.manifest import read_manifest

        manifest = read_manifest(src, verify=False)
        if args.backend == "torch":  # the default: an export runs on its own runtime
            args.backend = manifest["graph_format"]
        return manifest["_spec"], dict(manifest.get("checkpoint_meta") or {}), None, fmt
    from dvt_core.checkpoint.files import read_checkpoint
    from dvt_core.runtime.builder import resolve_spec

    ckpt = read_checkpoint(src)
    if args.out is None:
        fmt = "torch" if ckpt.format == "official" else ckpt.format
    return resolve_spec(args.model, ckpt, **parse_overrides(args.override)), ckpt.meta, ckpt, fmt


def run(args) -> int:
    src, shipped, exported = _source(args)
    dst, fmt = _target(args, src, shipped, exported)
    check_outputs(args, args.json)
    limit = check_limit(args.limit, "--limit")
    if args.budget is not None and (not np.isfinite(args.budget) or args.budget <= 0):
        raise ArgumentError(f"--budget must be a positive number of MACs, got {args.budget:g}")

    early, meta, ckpt, fmt = _read_source(args, src, exported, fmt)
    if early.num_exits < 2:
        raise ArgumentError(f"{early.name} has a single exit: there are no thresholds to calibrate")
    check_budget_option(args.budget, early)
    seconds = None if args.latency_budget is None else \
        latency_costs(meta, args.backend, args.precision, args.profile_batch, str(src))
    images, labels, data_desc = calibration_set(meta, early, args.dataset, limit)
    if len(labels) < FEW_HOLDOUT and not limit:  # found on a handful of images, they move with every draw
        print(f"# note: calibrating on only {len(labels)} images; below about {FEW_HOLDOUT} the operating point is "
              "noise: pass --dataset DIR with more labelled images the model did not train on", file=sys.stderr)
    model = build_from_args(args, weights=str(src))
    spec = model.spec
    probs = evaluation.exit_probs(model, images, progress=show_progress(), desc=f"{spec.name} calibration")
    if seconds is None:
        found = operating_point.calibrate(probs, labels, spec, args.budget)
    else:
        found = operating_point.calibrate_latency(probs, labels, spec, args.latency_budget, seconds)
    thresholds, chosen = found["thresholds"], {**found["calibration"], **data_desc}
    shares = chosen["exit_shares"]
    new_meta = operating_point.calibrated_meta(meta, spec, thresholds, chosen, found["budgets"],
                                               keep_budgets=seconds is None,  # a time budget needs the shares
                                               holdout_anytime_accuracy=found["holdout_anytime_accuracy"])
    if exported:
        from dvt_core.export.manifest import rewrite_operating_points

        written = rewrite_operating_points(src, new_meta)
    else:
        from dvt_core.checkpoint.files import write_checkpoint

        written = write_checkpoint(dst, ckpt.canonical_state(spec.num_exits, spec.in_chans), new_meta, fmt=fmt,
                                   force=True)

    how = f"budget #{chosen['budget_index']}" if "budget_index" in chosen else chosen["policy"]
    out = sys.stderr if args.json == "-" else sys.stdout
    target = f"{format_mmacs(args.budget)} MACs" if seconds is None else \
        f"{args.latency_budget * 1e3:.4g} ms per image ({args.backend} {args.precision}, batch {args.profile_batch})"
    print(f"{spec.name}: target {target} -> {how}: thresholds {format_thresholds(thresholds)}", file=out)
    where = f"{data_desc['dataset']} ({'its held-out part' if data_desc['split'] == 'holdout' else 'all of it'})"
    print(f"on {len(labels)} calibration images of {where}: {chosen['holdout_accuracy']:.2f}% at "
          f"{format_mmacs(chosen['holdout_macs'])} MACs on average; exits taken "
          f"{' / '.join(f'{s:.0%}' for s in shares)}", file=out)
    if seconds is not None:
        _print_latency(meta, args, shares, chosen, out)
    print(f"wrote {written}", file=out)
    emit_json({"model": spec.name, "weights": str(dst), "thresholds": new_meta["thresholds"], **chosen}, args.json,
              force=args.force)
    return 0


def _print_latency(meta, args, shares, chosen, out) -> None:
    """The time the profile expects, and whether early exit pays at each measured batch size."""
    from dvt_core.runtime import cost_model

    profile = cost_model.stored_profile(meta, args.backend, args.precision, "the checkpoint")
    print(f"expected {chosen['holdout_ms']:.4g} ms per image on the measured profile", file=out)
    for line in cost_model.payoff_lines(profile, shares):
        print(f"  {line}", file=out)
