"""``dvt calibrate``: store the thresholds for a target average cost in a checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .. import data as dvt_data
from ..zoo import get_spec
from ._shared import (UserError, parse_overrides, add_common_options, emit_json, _is_fashion_mnist,
                      load_dataset, holdout_params, _progress, _check_limit, _is_shipped_file, build_from_args,
                      _fmt_thresholds, _mmacs, exit_macs, match_folder_classes, _check_budget)

HELP = "store the thresholds for a target average cost in a checkpoint"


def add_arguments(parser) -> None:
    add_common_options(parser)
    parser.add_argument("--budget", type=float, required=True, help="target average MACs per image")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--out", default=None, help="checkpoint to write (default: overwrite --weights)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                   help="calibrate on only the first N held-out images (quick runs; default: all)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--json", default=None, help="write the result as JSON here ('-' for stdout)")


def _corner_policies(probs, labels, costs):
    """"Every image leaves at exit k" for each k: the cheapest and the plainest operating points, which
    the official budget sweep does not contain. Returns (thresholds, accuracy, cost) arrays."""
    from .. import policy

    n = len(costs)
    ts, accs, cs = [], [], []
    for k in range(n):
        t = np.full(n, policy.NEVER, dtype=np.float32)
        t[k] = policy.ALWAYS
        t[-1] = policy.ALWAYS
        a, c = policy.evaluate(probs, labels, t, costs)
        ts.append(t)
        accs.append(a)
        cs.append(c)
    return np.stack(ts), np.asarray(accs), np.asarray(cs)


def run(args) -> int:
    from .. import evaluation, policy
    from ..checkpoints import format_for_suffix, read_checkpoint, write_checkpoint
    from ..errors import CheckpointError

    if args.weights is None:
        raise UserError("name the checkpoint to calibrate with --weights FILE "
                        "(or --weights default --model NAME --out FILE)")
    if args.weights == "default":
        if args.model is None:
            raise UserError("--weights default needs --model NAME")
        from ..weights import default_weights_path

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
    limit = _check_limit(args.limit, "--limit")
    if not np.isfinite(args.budget) or args.budget <= 0:
        raise UserError(f"--budget must be a positive number of MACs, got {args.budget:g}")

    from ..builder import resolve_spec

    ckpt = read_checkpoint(src)
    if args.out is None:
        fmt = "torch" if ckpt.format == "official" else ckpt.format
    early = resolve_spec(args.model, ckpt, **parse_overrides(args.override))  # checks before building
    if early.num_exits < 2:
        raise UserError(f"{early.name} has a single exit: there are no thresholds to calibrate")
    _check_budget(args.budget, early)
    model = build_from_args(args, weights=str(src))
    spec = model.spec
    costs = exit_macs(spec)

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
    sweep = policy.budget_sweep(probs, labels, probs, labels, costs)
    ct, ca, cc = _corner_policies(probs, labels, costs)
    n_corner = len(cc)
    full = policy.BudgetSweep(budgets=np.concatenate([sweep.budgets, np.zeros(n_corner)]),
                              fractions=np.concatenate([sweep.fractions, np.eye(n_corner, dtype=np.float32)]),
                              thresholds=np.concatenate([sweep.thresholds, ct]),
                              accuracy=np.concatenate([sweep.accuracy, ca]), cost=np.concatenate([sweep.cost, cc]))
    try:
        thresholds = policy.thresholds_for_cost(full, args.budget)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    row = next(i for i in range(len(full)) if np.array_equal(full.thresholds[i], thresholds)
               and full.cost[i] <= args.budget)
    shares = np.bincount(policy.assign_exits(probs, thresholds), minlength=spec.num_exits) / len(labels)
    chosen = {"target_macs": float(args.budget), "holdout_macs": float(full.cost[row]),
              "holdout_accuracy": float(full.accuracy[row]), "exit_shares": [float(s) for s in shares],
              "images": int(len(labels)), **data_desc}
    if row < len(sweep):
        chosen["budget_index"] = int(full.budgets[row])
    else:
        chosen["policy"] = f"every image leaves at exit {row - len(sweep) + 1}"

    meta = dict(ckpt.meta)
    meta.setdefault("arch", spec.name)
    meta.setdefault("spec", spec.to_dict())
    meta.setdefault("exit_macs", costs)
    meta["thresholds"] = [float(t) for t in thresholds]
    meta["calibration"] = chosen
    for stale in ("default_budget", "default_operating_point", "subset_adaptive"):  # described the old thresholds
        meta.pop(stale, None)
    if not meta.get("budgets"):
        meta["budgets"] = [{"budget": int(b), "thresholds": [float(v) for v in t], "holdout_accuracy": float(a),
                            "holdout_macs": float(c)}
                           for b, t, a, c in zip(sweep.budgets, sweep.thresholds, sweep.accuracy, sweep.cost)]
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
