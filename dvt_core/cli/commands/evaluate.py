"""``dvt evaluate``: anytime accuracy and the budget curve on a data set."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from dvt_core.errors import ArgumentError, DVTError
from dvt_core.model.zoo import get_spec
from dvt_core.data.datasets import is_fashion_mnist as _is_fashion_mnist
from dvt_core.cli.commands._shared import (add_force_option, check_outputs, check_picture, add_common_options, emit_json,
                      show_progress, check_limit, has_shipped_weights, resolve_weights, build_from_args, model_meta,
                      exit_names, format_mmacs, print_table, exit_macs, early_spec, format_thresholds, fmt_threshold, latency_costs)

HELP = "anytime accuracy and the budget curve on a data set"


def add_arguments(parser) -> None:
    add_common_options(parser)
    parser.add_argument("--dataset", default=None,
                        help="fashion-mnist or a folder with one sub-folder per class, named after the model's "
                             "classes (default: the data set the checkpoint was trained on, else fashion-mnist)")
    parser.add_argument("--split", default=None, choices=["train", "test", "holdout", "all"],
                        help="Fashion-MNIST: train, test or holdout (default test); a folder: all of it, or "
                             "holdout, the part its training kept out (default for the folder it was trained on)")
    parser.add_argument("--calibration", default="holdout", choices=["holdout", "same"],
                   help="where thresholds are found: the held-out part of the data the checkpoint was trained "
                        "on, or the evaluated images (optimistic)")
    parser.add_argument("--json", default=None, help="write the results as JSON here ('-' for stdout)")
    parser.add_argument("--plot", default=None, help="write the accuracy-MACs plot here (.png, .jpg, .svg, .pdf)")
    parser.add_argument("--plot-cost", default="macs", choices=["macs", "time"],
                        help="the plot's cost axis: MACs, or the ms per image the cost profile `dvt profile` stored "
                             "for this runtime and precision expects (at --profile-batch)")
    parser.add_argument("--profile-batch", type=int, default=1, metavar="B",
                        help="with --plot-cost time: the measured batch size whose times apply (default 1)")
    add_force_option(parser)
    parser.add_argument("--baselines", default="auto", help="static baselines to plot: auto, none, or comma-separated names")
    parser.add_argument("--batch-size", type=int, default=500, help="images per forward pass")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--calibration-limit", type=int, default=None, metavar="N",
                   help="find thresholds on only the first N held-out images (quick runs; default: all)")


def _baseline_names(args, spec, dataset) -> list[str]:
    choice = (args.baselines or "auto").strip()
    from dvt_core.runtime.contract import runtime_names

    if choice == "none" or (choice == "auto" and args.backend in runtime_names("export")):  # baselines need a framework
        return []
    if choice != "auto":
        names = [n.strip() for n in choice.split(",") if n.strip()]
        for n in names:
            get_spec(n)
        return names
    if spec.num_exits < 2 or not _is_fashion_mnist(dataset):
        return []
    from dvt_core.checkpoint.registry import registry

    try:
        shipped = registry().get("shipped") or {}
    except DVTError:
        return []
    out = []
    for name, entry in sorted(shipped.items()):
        if not name.startswith("static_") or entry.get("dataset") != "fashion-mnist":
            continue
        other = get_spec(name)
        if (other.img_size, other.in_chans, other.num_classes) == (spec.img_size, spec.in_chans, spec.num_classes):
            out.append(name)
    return out


def _evaluate_baselines(args, names, images, labels) -> list[dict]:
    from types import SimpleNamespace

    from dvt_core.runtime import evaluation

    from dvt_core.runtime import policy

    rows = []
    for name in names:
        if args.baselines == "auto" and not has_shipped_weights(name):
            continue
        ns = SimpleNamespace(model=name, weights="default", override=None, backend=args.backend, device=args.device,
                             precision=args.precision)  # the baselines at the DVT's precision: like with like
        model = build_from_args(ns)
        probs = evaluation.exit_probs(model, images, args.batch_size, progress=show_progress(), desc=name)
        costs = exit_macs(model.spec)
        acc = policy.anytime_accuracy(probs, labels)
        rows.append({"model": name, "macs": costs[-1], "accuracy": float(acc[-1])})
    return rows


def _evaluated_set(args, spec, meta):
    """(images, labels, classes, dataset, split) that --dataset / --split name, with the checkpoint's
    training data as the default."""
    from dvt_core.data.datasets import dataset_key, load_for_model, trained_on

    origin = trained_on(meta)
    dataset = args.dataset if args.dataset is not None else (origin["dataset"] if origin else "fashion-mnist")
    fashion = _is_fashion_mnist(dataset)
    own_folder = (not fashion and origin is not None and not _is_fashion_mnist(origin["dataset"])
                  and dataset_key(dataset) == dataset_key(origin["dataset"]))
    split = args.split or ("test" if fashion else "holdout" if own_folder else "all")
    if fashion and split == "all":
        raise ArgumentError("fashion-mnist has the splits train, test and holdout; --split all is for a folder")
    if not fashion and split in ("train", "test"):
        raise ArgumentError(f"a folder has no {split} split: evaluate all of it (--split all) or, for the folder the "
                        "checkpoint was trained on, its held-out part (--split holdout)")
    if not fashion and not Path(dataset).exists():
        raise ArgumentError(f"unknown dataset {dataset!r}: use fashion-mnist or a folder with one sub-folder per class")
    if split == "holdout":
        if not fashion and not own_folder:
            raise ArgumentError(f"{dataset} is not the folder the checkpoint was trained on; its held-out part is "
                            "unknown: use --split all")
        from dvt_core.data.datasets import calibration_set, model_classes
        from dvt_core.data.sources import FASHION_MNIST_CLASSES

        images, labels, _ = calibration_set(meta, spec, dataset)
        classes = list(FASHION_MNIST_CLASSES) if fashion else model_classes(meta, spec.num_classes)
    else:
        images, labels, classes = load_for_model(dataset, split, spec, meta)
    return images, labels, classes, dataset, split


def _default_point(meta, spec, probs, labels, costs):
    """Accuracy and average MACs on the evaluated images at the checkpoint's default thresholds (None when it
    stores none)."""
    from dvt_core.runtime import policy
    from dvt_core.runtime.early_exit import normalize_thresholds

    if spec.num_exits < 2 or meta.get("thresholds") is None:
        return None
    t = normalize_thresholds(meta["thresholds"], spec.num_exits)
    acc, macs = policy.evaluate(probs, labels, t, costs)
    shares = np.bincount(policy.assign_exits(probs, t), minlength=spec.num_exits) / max(len(labels), 1)
    return {"thresholds": [float(v) for v in t], "accuracy": float(acc), "macs": float(macs),
            "exit_shares": [float(v) for v in shares]}


def run(args) -> int:
    from dvt_core.runtime import evaluation
    from dvt_core.runtime import policy

    limit = check_limit(args.limit, "--limit")
    cal_limit = check_limit(args.calibration_limit, "--calibration-limit")
    if args.batch_size < 1:
        raise ArgumentError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_outputs(args, args.json, args.plot)
    check_picture(args.plot)
    if args.dataset is not None and not _is_fashion_mnist(args.dataset) and not Path(args.dataset).exists():
        raise ArgumentError(f"unknown dataset {args.dataset!r}: use fashion-mnist or a folder with one sub-folder "
                        "per class")
    early_spec(args)
    model = build_from_args(args, resolve_weights(args))
    spec, meta = model.spec, model_meta(model)
    if args.plot and args.plot_cost == "time":  # no stored profile for this runtime: said before any work
        latency_costs(meta, args.backend, args.precision, args.profile_batch, str(args.weights or "the weights"))
    multi = spec.num_exits > 1
    images, labels, classes, dataset, split = _evaluated_set(args, spec, meta)
    fashion = _is_fashion_mnist(dataset)
    if limit:
        images, labels = images[:limit], labels[:limit]
    split_name = split if fashion else ("(held-out part)" if split == "holdout" else "(all images)")
    probs = evaluation.exit_probs(model, images, args.batch_size, progress=show_progress(), desc=f"{spec.name} {split}")
    costs = exit_macs(spec)
    anytime = policy.anytime_accuracy(probs, labels)

    budgets, calibration = _budget_curve(args, model, meta, probs, labels, split, fashion, cal_limit) if multi \
        else ([], None)

    baselines = _evaluate_baselines(args, _baseline_names(args, spec, dataset), images, labels)
    default = _default_point(meta, spec, probs, labels, costs)
    result = {"model": spec.name, "backend": args.backend, "weights": str(args.weights or "default"),
              "dataset": str(dataset), "split": split, "images": int(len(labels)),
              "classes": classes, "exit_macs": costs, "anytime_accuracy": [float(a) for a in anytime],
              "default_operating_point": default,
              "calibration": calibration, "budgets": budgets, "static_baselines": baselines}

    out = sys.stderr if args.json == "-" else sys.stdout
    _print_evaluation(result, spec, split_name, out)
    emit_json(result, args.json, force=args.force)
    if args.plot:
        from dvt_core.cli.plots import accuracy_macs_plot

        where = f"{Path(str(dataset)).name if not fashion else dataset} {split_name}, {len(labels)} images"
        plotted = (costs, budgets, baselines, default, {}) if args.plot_cost == "macs" else \
            _time_axis(args, meta, probs, costs, budgets, default)
        accuracy_macs_plot(args.plot, spec.name, plotted[0], result["anytime_accuracy"], plotted[1], plotted[2],
                           grids=[st.grid for st in spec.stages], default=plotted[3],
                           title=f"{spec.name} ({args.backend}) on {where}", force=args.force, **plotted[4])
        print(f"wrote {args.plot}", file=out)
    if args.json not in (None, "-"):
        print(f"wrote {args.json}", file=out)
    return 0


OPTIMISTIC = ("note: the evaluated images are the held-out part the thresholds are found on: the budget curve is "
              "optimistic; evaluate on images the model never saw for an honest one")


def _stored_budget_curve(meta, spec, probs, labels):
    """(the budget curve, what its thresholds were found on) from the budgets table the checkpoint stores (each
    budget's thresholds, found on its held-out training images when it was trained), applied to the evaluated
    images; None when it stores no full table or does not say where it was trained."""
    from dvt_core.data.datasets import trained_on
    from dvt_core.runtime import policy
    from dvt_core.runtime.early_exit import normalize_thresholds

    table, origin = meta.get("budgets"), trained_on(meta)
    if (not isinstance(table, list) or len(table) != len(policy.PYTORCH_BUDGETS) or origin is None
            or not isinstance(origin["holdout"], int)):
        return None
    costs, budgets = exit_macs(spec), []
    for row in table:
        t = normalize_thresholds(row["thresholds"], spec.num_exits)
        acc, macs = policy.evaluate(probs, labels, t, costs)
        budgets.append({"budget": int(row["budget"]), "macs": float(macs), "accuracy": float(acc),
                        "thresholds": [float(v) for v in t]})
    where = "fashion-mnist" if _is_fashion_mnist(origin["dataset"]) else origin["dataset"]
    return budgets, {"data": f"held-out training images of {where} (the checkpoint's budgets table)",
                     "images": origin["holdout"], "holdout": origin["holdout"], "seed": origin["seed"]}


def _budget_curve(args, model, meta, probs, labels, split, fashion, cal_limit):
    """(the 59-budget curve, what its thresholds were found on): on the evaluated images (--calibration
    same) or on the checkpoint's held-out training images."""
    from dvt_core.data.datasets import calibration_set
    from dvt_core.runtime import evaluation, policy

    spec, costs = model.spec, exit_macs(model.spec)
    stored = None if args.calibration == "same" or cal_limit else _stored_budget_curve(meta, spec, probs, labels)
    if stored is not None:  # the held-out part's thresholds are in the checkpoint: no need to score it again
        if split == "holdout":  # only the training data set has a held-out part to evaluate
            print(OPTIMISTIC, file=sys.stderr)
        return stored
    if args.calibration == "same":
        cal_probs, cal_labels = probs, labels
        calibration = {"data": "evaluated images", "images": int(len(labels))}
    else:
        hx, hy, desc = calibration_set(meta, spec, None, cal_limit)
        if split == "holdout" and desc["split"] == "holdout" and _is_fashion_mnist(desc["dataset"]) == fashion:
            print(OPTIMISTIC, file=sys.stderr)
        cal_probs = evaluation.exit_probs(model, hx, args.batch_size, progress=show_progress(),
                                          desc=f"{spec.name} holdout")
        cal_labels = hy
        calibration = {"data": f"held-out training images of {desc['dataset']}", "images": int(len(hy)),
                       **{k: desc[k] for k in ("holdout", "seed") if k in desc}}
    sweep = policy.budget_sweep(cal_probs, cal_labels, probs, labels, costs)
    budgets = [{"budget": int(b), "macs": float(c), "accuracy": float(a), "thresholds": [float(v) for v in t]}
               for b, c, a, t in zip(sweep.budgets, sweep.cost, sweep.accuracy, sweep.thresholds)]
    return budgets, calibration


def _print_evaluation(result: dict, spec, split_name: str, out) -> None:
    print(f"{result['model']} ({result['backend']}) on {result['dataset']} {split_name}: {result['images']} images",
          file=out)
    rows = [[exit_names(spec)[k], format_mmacs(m), f"{a:.2f}%"]
            for k, (m, a) in enumerate(zip(result["exit_macs"], result["anytime_accuracy"]))]
    print_table(["every image at", "MACs", "accuracy"], rows, out, right=[0])
    default = result.get("default_operating_point")
    if default:
        print(f"\nat the checkpoint's default thresholds ({format_thresholds(default['thresholds'])}): "
              f"{default['accuracy']:.2f}% at {format_mmacs(default['macs'])} MACs on average; exits taken "
              f"{' / '.join(f'{s:.0%}' for s in default['exit_shares'])}", file=out)
    budgets = result["budgets"]
    if budgets:
        cal = result["calibration"]
        print(f"\nbudgeted early exit: {len(budgets)} budgets, thresholds from {cal['images']} {cal['data']}",
              file=out)
        pick = sorted({0, len(budgets) - 1, *range(4, len(budgets), 10)})
        rows = [[str(budgets[i]["budget"]), format_mmacs(budgets[i]["macs"]), f"{budgets[i]['accuracy']:.2f}%",
                 ", ".join(fmt_threshold(t, 3) for t in budgets[i]["thresholds"][:-1])] for i in pick]
        print_table(["budget #", "avg MACs", "accuracy", "thresholds"], rows, out, right=[3])
    if result["static_baselines"]:
        print("\nstatic baselines:", file=out)
        rows = []
        for b in result["static_baselines"]:
            reach = [x for x in budgets if x["accuracy"] >= b["accuracy"]]
            note = ""
            if reach:
                best = min(reach, key=lambda x: x["macs"])
                ratio = b["macs"] / max(best["macs"], 1.0)
                note = (f"DVT reaches it at {format_mmacs(best['macs'])} MACs ("
                        + (f"{ratio:.2f}x fewer)" if ratio >= 1 else f"{1 / ratio:.2f}x more)"))
            elif budgets:
                note = f"DVT stays below it (best {max(x['accuracy'] for x in budgets):.2f}%)"
            rows.append([b["model"], format_mmacs(b["macs"]), f"{b['accuracy']:.2f}%", note])
        print_table(["model", "MACs", "accuracy", ""], rows, out, right=[0, 3])


def _time_axis(args, meta, probs, costs, budgets, default) -> tuple:
    """--plot-cost time: the exits, budgets and default point priced in expected ms per image under the stored
    cost profile (the test split's exit shares of each operating point); the static baselines have no
    measured time here and are left out."""
    from dvt_core.runtime.policy import assign_exits

    seconds_of = latency_costs(meta, args.backend, args.precision, args.profile_batch,
                               str(args.weights or "the weights"))

    def ms(thresholds) -> float:
        return seconds_of(np.bincount(assign_exits(probs, thresholds), minlength=len(costs)) / probs.shape[1]) * 1e3

    timed = [dict(b, macs=ms(b["thresholds"])) for b in budgets]
    point = None if not default else dict(default, macs=ms(default["thresholds"]))
    label = f"expected ms per image ({args.backend} {args.precision}, batch {args.profile_batch}, measured profile)"
    exit_ms = [seconds_of(np.eye(len(costs))[k]) * 1e3 for k in range(len(costs))]
    return exit_ms, timed, [], point, {"unit": (label, 1.0, " ms")}
