"""What each ``dvt`` subcommand does. The parser lives in :mod:`dvt_core.cli`."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from . import data as dvt_data
from .cli import UserError, emit_json, parse_overrides
from .errors import DVTError
from .zoo import get_spec, list_models


# ---- shared helpers --------------------------------------------------------------------------------

def _is_fashion_mnist(name: str) -> bool:
    return str(name).lower().replace("_", "-") == "fashion-mnist"


def load_dataset(name: str, split: str, spec, holdout: Optional[int] = None, seed: Optional[int] = None):
    """(uint8 images, int64 labels, class names) of ``fashion-mnist`` or an image folder.

    ``split="holdout"`` is the part of the training set kept out of training: ``holdout`` images drawn
    with ``seed``, as the trainer draws them (defaults: :class:`~dvt_core.training.TrainConfig`'s; pass
    a checkpoint's own with :func:`holdout_params`). An image folder has no splits: all of it is used.
    """
    if _is_fashion_mnist(name):
        if split == "holdout":
            x, y = dvt_data.load_fashion_mnist("train")
            default_size, default_seed = holdout_params(None)
            size = default_size if holdout is None else int(holdout)
            _, hold = dvt_data.split_holdout(len(x), size, default_seed if seed is None else int(seed))
            return x[hold], y[hold], list(dvt_data.FASHION_MNIST_CLASSES)
        x, y = dvt_data.load_fashion_mnist(split)
        return x, y, list(dvt_data.FASHION_MNIST_CLASSES)
    root = Path(name)
    if not root.exists():
        raise UserError(f"unknown dataset {name!r}: use fashion-mnist or a folder with one sub-folder per class")
    if spec.in_chans not in (1, 3):
        raise UserError(f"{spec.name} takes {spec.in_chans}-channel images; image files give 1 (grey) or 3 (RGB)")
    x, y, classes = dvt_data.load_image_folder(root, img_size=spec.img_size, channels=spec.in_chans)
    return x, y, classes


def holdout_params(meta: Optional[dict]) -> tuple[int, int]:
    """(size, seed) of the held-out part a checkpoint's training kept out (the trainer's defaults if unknown)."""
    from .training import TrainConfig

    meta = meta or {}
    train = meta.get("train") or {}
    size = train.get("holdout", meta.get("holdout", TrainConfig().holdout))
    seed = train.get("seed", meta.get("holdout_indices_seed", TrainConfig().seed))
    return int(size), int(seed)


def _progress() -> bool:
    """Progress bars only for a person watching (stderr is a terminal)."""
    return sys.stderr.isatty()


def _check_limit(value: Optional[int], option: str) -> Optional[int]:
    if value is not None and value < 1:
        raise UserError(f"{option} must be at least 1, got {value}")
    return value


def _has_shipped_weights(name: Optional[str]) -> bool:
    from .weights import shipped_models

    try:
        return name in shipped_models()
    except DVTError:
        return False


def _is_shipped_file(path) -> bool:
    """True when ``path`` is one of the weight files this project ships (their SHA-256 is registered)."""
    from .weights import registry, weights_dir

    try:
        entries = (registry().get("shipped") or {}).values()
    except DVTError:
        return False
    target = Path(path).resolve()
    return any((weights_dir() / e["file"]).resolve() == target for e in entries if "file" in e)


def resolve_weights(args) -> str:
    """--weights as given; without it the shipped weights of --model, else an error (random weights
    would give meaningless results)."""
    if args.weights is not None:
        return args.weights
    if args.model is None:
        raise UserError("name a model with --model (see `dvt flops --list`) or a checkpoint with --weights FILE")
    get_spec(args.model)  # unknown model: say so first
    if _has_shipped_weights(args.model):
        return "default"
    raise UserError(f"no weights ship for {args.model}; pass --weights FILE (a trained checkpoint)")


def build_from_args(args, weights=None):
    """The model named by --model/--weights/--override for --backend, on --device."""
    from .builder import build, get_backend
    from .errors import CheckpointError

    overrides = parse_overrides(getattr(args, "override", None))
    weights = weights if weights is not None else getattr(args, "weights", None)
    if args.model is None and weights in (None, "default"):
        raise UserError("name a model with --model (see `dvt flops --list`)")
    # Cheap checks first, so a mistake is reported before a framework is imported.
    if args.model is not None:
        get_spec(args.model)  # an unknown name is reported as such, before any weights are looked up
    if weights is not None and str(weights) != "default" and not Path(weights).exists():
        raise UserError(f"weights file not found: {weights}")
    if str(weights) == "default":
        from .weights import default_weights_path

        default_weights_path(args.model, verify=False)  # no weights ship for this model: say so now
    get_backend(args.backend)
    try:
        model = build(args.model, backend=args.backend, weights=weights, **overrides)
    except CheckpointError as exc:
        problems = exc.missing or exc.unexpected or exc.mismatched
        if not problems:
            raise
        counts = ", ".join(f"{len(v)} {k}" for k, v in (("missing", exc.missing), ("unexpected", exc.unexpected),
                                                            ("mismatched", exc.mismatched)) if v)
        want = args.model or "the model it names"
        raise UserError(f"{weights} does not fit {want} ({counts} tensors, e.g. {problems[0]}); "
                        "is it the checkpoint of another model, or does it need -O overrides?") from None
    return to_device(model, args.backend, args.device)


def to_device(model, backend: str, device):
    """The model on ``device`` (the backend knows its devices); InputError for one it does not have."""
    if device is None:
        return model
    from .builder import get_backend

    return get_backend(backend).to_device(model, device)


def _meta(model) -> dict:
    return dict(getattr(model, "checkpoint_meta", None) or {})


def _class_names(meta: dict, num_classes: int) -> Optional[list]:
    classes = meta.get("classes")
    if isinstance(classes, list) and len(classes) == num_classes:
        return [str(c) for c in classes]
    return None


def exit_names(spec) -> list[str]:
    """``exit 1/3 (2x2 tokens)`` per exit."""
    n = spec.num_exits
    return [f"exit {k + 1}/{n} ({st.grid}x{st.grid} tokens)" for k, st in enumerate(spec.stages)]


def _fmt_thresholds(thresholds) -> str:
    """All thresholds but the last (which takes every image left), sentinels spelled out."""
    def one(t):
        return "1e8 (none leave)" if t >= 1e8 else "-1e8 (all leave)" if t <= -1e8 else f"{t:.4f}"

    return ", ".join(one(float(t)) for t in list(thresholds)[:-1]) or "-"


def _mmacs(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def _table(header: list[str], rows: list[list[str]], file=None, right=None) -> None:
    """Print an aligned text table (columns right-aligned except those named in ``right=False``)."""
    file = file or sys.stdout
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    left = set(right or ())

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(fmt(header).rstrip(), file=file)
    for r in rows:
        print(fmt(r).rstrip(), file=file)


def parse_thresholds(text: str, num_exits: int) -> np.ndarray:
    """``"0.9,0.8"`` -> float32 thresholds for every exit (the last one is -1e8: everything left leaves)."""
    from .early_exit import normalize_thresholds

    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UserError(f"--thresholds must be comma-separated numbers, got {text!r}") from None
    if num_exits == 1 and not values:
        return np.float32([-1e8])
    try:
        return normalize_thresholds(values, num_exits)
    except DVTError as exc:
        raise UserError(f"--thresholds: {exc}") from None


def budget_operating_point(meta: dict, budget: float, spec, source: str = "the checkpoint") -> dict:
    """The calibrated operating point to use for a target average cost of ``budget`` MACs.

    From the checkpoint's ``budgets`` table (thresholds found on the held-out training part): the most
    accurate entry whose average cost on the held-out part is at most ``budget`` (its test-split
    numbers are never used to choose); among equally accurate ones the cheapest. Entries carrying no
    held-out numbers fall back on their test-split ones.
    """
    costs = exit_macs(spec)
    _check_budget(budget, spec)
    table = [b for b in (meta.get("budgets") or []) if isinstance(b, dict) and "thresholds" in b]
    if not table:
        raise UserError(f"{source} holds no calibrated budgets; pass --thresholds, or store thresholds for "
                        f"a budget with `dvt calibrate --weights FILE --budget {budget:g}`")

    def cost(b):
        return float(b.get("holdout_macs", b.get("test_macs", b.get("macs", np.inf))))

    def acc(b):
        return float(b.get("holdout_accuracy", b.get("test_accuracy", b.get("accuracy", 0.0))))

    # "Every image leaves at exit k" costs exactly exit k's MACs; with the held-out accuracy of each exit
    # stored it competes with the table, else exit 1 alone serves budgets below the table's cheapest entry.
    n = spec.num_exits
    anytime = meta.get("holdout_anytime_accuracy")
    corners = []
    for k in range(n):
        t = [1e8] * n
        t[k] = t[-1] = -1e8
        if isinstance(anytime, list) and len(anytime) == n:
            corners.append({"thresholds": t, "holdout_macs": costs[k], "holdout_accuracy": float(anytime[k]),
                            "policy": f"every image leaves at exit {k + 1}"})
        elif k == 0:
            corners.append({"thresholds": t, "holdout_macs": costs[0], "holdout_accuracy": -1.0,
                            "policy": "every image leaves at exit 1"})
    fits = [b for b in table + corners if cost(b) <= budget]
    best = max(fits, key=lambda b: (acc(b), -cost(b)))
    return {"thresholds": [float(t) for t in best["thresholds"]], "budget_index": best.get("budget"),
            "policy": best.get("policy"), "expected_macs": cost(best),
            "expected_accuracy": acc(best) if acc(best) >= 0 else None}


def choose_thresholds(args, spec, meta: dict, source: str) -> tuple[np.ndarray, str]:
    """Thresholds from --thresholds, --budget, or the checkpoint's own; and a phrase saying which."""
    from .early_exit import normalize_thresholds

    if spec.num_exits == 1:
        return np.float32([-1e8]), "single exit"
    if getattr(args, "thresholds", None):
        return parse_thresholds(args.thresholds, spec.num_exits), "--thresholds"
    if getattr(args, "budget", None) is not None:
        op = budget_operating_point(meta, args.budget, spec, source)
        chosen = op["policy"] or f"calibrated budget index {op['budget_index']}"
        expect = (f"{op['expected_accuracy']:.2f}% at " if op["expected_accuracy"] is not None else "") + \
            f"{_mmacs(op['expected_macs'])} MACs"
        what = f"budget {_mmacs(args.budget)} MACs -> {chosen}; held-out: {expect}"
        return normalize_thresholds(op["thresholds"], spec.num_exits), what
    if meta.get("thresholds") is not None:
        return normalize_thresholds(meta["thresholds"], spec.num_exits), f"the default stored in {source}"
    raise UserError(f"{source} stores no thresholds; pass --thresholds t1,t2,... or --budget MACS "
                    "(or store them with `dvt calibrate`)")


def exit_macs(spec) -> list[int]:
    from .macs import exit_macs as _exit_macs

    return [int(m) for m in _exit_macs(spec)]


# ---- flops -------------------------------------------------------------------------------------------

def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


def cmd_flops(args) -> int:
    from .macs import macs_table

    if args.list or not args.name:
        if not args.list and not args.name:
            raise UserError("name a model, or pass --list")
        names = list_models()
        if args.json:
            print(json.dumps(names))
        else:
            print("\n".join(names))
        return 0
    rows = macs_table(args.name, **parse_overrides(args.override))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    spec = get_spec(args.name, **parse_overrides(args.override))
    print(f"{spec.name}: {spec.num_exits} exit(s), {spec.img_size}x{spec.img_size}x{spec.in_chans} input, "
          f"feature reuse {'on' if spec.feature_reuse else 'off'}, relation reuse "
          f"{'on' if spec.relation_reuse else 'off'}")
    header = ["exit", "grid", "tokens", "stage MACs", "exit MACs", "stage params", "exit params"]
    table = [[str(r["stage"] + 1), r["grid"], str(r["tokens"]), _human(r["stage_macs"]),
              _human(r["exit_macs"]), _human(r["params"]), _human(r["exit_params"])] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for t in table:
        print("  ".join(c.rjust(w) for c, w in zip(t, widths)))
    return 0


# ---- convert -----------------------------------------------------------------------------------------

def cmd_convert(args) -> int:
    from .checkpoints import format_for_suffix
    from .convert import convert
    from .errors import CheckpointError

    if args.to is None:
        try:
            format_for_suffix(args.dst)
        except CheckpointError:
            raise UserError(f"cannot tell the output format from {args.dst}'s suffix; name it .safetensors, .pth "
                            "or .ckpt, or pass --to torch|safetensors|mindspore") from None
    if not Path(args.src).exists():
        raise UserError(f"checkpoint not found: {args.src}")
    out = convert(args.src, args.dst, arch=args.arch, to=args.to, force=args.force,
                  overrides=parse_overrides(args.override))
    print(f"wrote {out['path']} ({out['format']}, {out['tensors']} tensors, arch {out['arch']})")
    return 0


# ---- train -------------------------------------------------------------------------------------------

def _check_resumable(state: Path, spec) -> None:
    """InputError unless ``state`` (a trainer's last.pth) holds the weights of ``spec``'s architecture."""
    from dvt_backends.torch.train import check_resumable

    check_resumable(state, spec)


def cmd_train(args) -> int:
    from .training import TrainConfig

    if args.model is None:
        raise UserError("name a model to train with --model")
    if args.backend != "torch":
        raise UserError("`dvt train` runs on the torch backend; fine-tune in MindSpore with "
                        "(see README)")
    spec = get_spec(args.model, **parse_overrides(args.override))
    cfg = TrainConfig()
    for field, value in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                         ("weight_decay", args.weight_decay), ("warmup_epochs", args.warmup_epochs),
                         ("holdout", args.holdout), ("seed", args.seed), ("max_steps", args.max_steps)):
        if value is not None:
            setattr(cfg, field, value)
    if args.no_augment:
        cfg.augment = False
    for option, value, low in (("--epochs", cfg.epochs, 1), ("--batch-size", cfg.batch_size, 1),
                               ("--holdout", cfg.holdout, 0), ("--max-steps", cfg.max_steps, 1)):
        if value is not None and value < low:
            raise UserError(f"{option} must be at least {low}, got {value}")
    if not cfg.lr > 0:
        raise UserError(f"--lr must be positive, got {cfg.lr:g}")
    images, labels, classes = load_dataset(args.dataset, "train", spec)
    if labels.max() >= spec.num_classes:
        raise UserError(f"{args.dataset} has {labels.max() + 1} classes but {spec.name} predicts "
                        f"{spec.num_classes}; pass -O num_classes={labels.max() + 1}")
    n_train = len(labels) - cfg.holdout
    if n_train < 1:
        given = "" if args.holdout is not None else " (the default)"
        raise UserError(f"{args.dataset} has {len(labels)} training images and --holdout {cfg.holdout}{given} keeps "
                        "them all out of training for calibration; pass a smaller --holdout")
    if n_train < cfg.batch_size:
        raise UserError(f"the batch size {cfg.batch_size} is larger than the {n_train} training images "
                        f"({len(labels)} minus {cfg.holdout} held out); pass a smaller --batch-size")
    state = Path(args.out) / "last.pth"
    if args.resume and not state.exists():
        print(f"nothing to resume ({state} does not exist): starting from scratch")
    elif args.resume:
        _check_resumable(state, spec)
    from dvt_backends.torch.train import train

    t0 = time.time()
    path = train(spec, images, labels, cfg, args.out, device=args.device, resume=args.resume,
                 progress=not args.no_progress and _progress(),
                 extra_meta={"classes": classes, "dataset": args.dataset})
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path} in {time.time() - t0:.0f} s")
    return 0


# ---- evaluate ----------------------------------------------------------------------------------------

def _norm_name(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def match_folder_classes(labels: np.ndarray, folder_classes: list, meta: dict, spec):
    """An image folder numbers its classes in sorted sub-folder order. When the checkpoint names its
    classes and every sub-folder matches one of them (ignoring case and punctuation), use the
    checkpoint's numbering; otherwise keep the folder's and say so when the names differ."""
    model_classes = _class_names(meta, spec.num_classes)
    if not model_classes:
        return labels, folder_classes
    lookup = {_norm_name(c): i for i, c in enumerate(model_classes)}
    index = [lookup.get(_norm_name(c)) for c in folder_classes]
    if all(i is not None for i in index):
        return np.asarray(index, dtype=np.int64)[labels], list(model_classes)
    if [_norm_name(c) for c in folder_classes] != [_norm_name(c) for c in model_classes[:len(folder_classes)]]:
        print(f"note: the folder's classes ({', '.join(folder_classes)}) are not the model's "
              f"({', '.join(model_classes)}); they are numbered in sorted order", file=sys.stderr)
    return labels, folder_classes


def _baseline_names(args, spec) -> list[str]:
    choice = (args.baselines or "auto").strip()
    if choice == "none":
        return []
    if choice != "auto":
        names = [n.strip() for n in choice.split(",") if n.strip()]
        for n in names:
            get_spec(n)
        return names
    if spec.num_exits < 2 or not _is_fashion_mnist(args.dataset):
        return []
    from .weights import registry

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

    from . import evaluation, policy

    rows = []
    for name in names:
        if args.baselines == "auto" and not _has_shipped_weights(name):
            continue
        ns = SimpleNamespace(model=name, weights="default", override=None, backend=args.backend, device=args.device)
        model = build_from_args(ns)
        probs = evaluation.exit_probs(model, images, args.batch_size, progress=_progress(), desc=name)
        costs = exit_macs(model.spec)
        acc = policy.anytime_accuracy(probs, labels)
        rows.append({"model": name, "macs": costs[-1], "accuracy": float(acc[-1])})
    return rows


def cmd_evaluate(args) -> int:
    from . import evaluation, policy

    limit = _check_limit(args.limit, "--limit")
    cal_limit = _check_limit(args.calibration_limit, "--calibration-limit")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    fashion = _is_fashion_mnist(args.dataset)
    if not fashion and not Path(args.dataset).exists():
        raise UserError(f"unknown dataset {args.dataset!r}: use fashion-mnist or a folder with one sub-folder "
                        "per class")
    early = _early_spec(args)
    if early is not None and early.num_exits > 1 and not fashion and args.calibration == "holdout":
        raise UserError(f"an image folder has no held-out training part to find thresholds on; pass "
                        f"--calibration same (thresholds found on {args.dataset} itself: optimistic)")
    model = build_from_args(args, resolve_weights(args))
    spec, meta = model.spec, _meta(model)
    multi = spec.num_exits > 1
    if multi and not fashion and args.calibration == "holdout":
        raise UserError(f"an image folder has no held-out training part to find thresholds on; pass "
                        f"--calibration same (thresholds found on {args.dataset} itself: optimistic)")
    hold_size, hold_seed = holdout_params(meta)
    images, labels, classes = load_dataset(args.dataset, args.split, spec, hold_size, hold_seed)
    if not fashion:
        labels, classes = match_folder_classes(labels, classes, meta, spec)
    if limit:
        images, labels = images[:limit], labels[:limit]
    if labels.max() >= spec.num_classes:
        raise UserError(f"{args.dataset} has {labels.max() + 1} classes but {spec.name} predicts {spec.num_classes}")
    split_name = args.split if fashion else "(all images)"
    probs = evaluation.exit_probs(model, images, args.batch_size, progress=_progress(), desc=f"{spec.name} {args.split}")
    costs = exit_macs(spec)
    anytime = policy.anytime_accuracy(probs, labels)

    budgets, calibration = [], None
    if multi:
        if args.calibration == "same":
            cal_probs, cal_labels = probs, labels
            calibration = {"data": "evaluated images", "images": int(len(labels))}
        else:
            hx, hy, _ = load_dataset(args.dataset, "holdout", spec, hold_size, hold_seed)
            if cal_limit:
                hx, hy = hx[:cal_limit], hy[:cal_limit]
            cal_probs = evaluation.exit_probs(model, hx, args.batch_size, progress=_progress(),
                                              desc=f"{spec.name} holdout")
            cal_labels = hy
            calibration = {"data": "held-out training images", "images": int(len(hy)), "holdout": hold_size,
                           "seed": hold_seed}
        sweep = policy.budget_sweep(cal_probs, cal_labels, probs, labels, costs)
        budgets = [{"budget": int(b), "macs": float(c), "accuracy": float(a), "thresholds": [float(v) for v in t]}
                   for b, c, a, t in zip(sweep.budgets, sweep.cost, sweep.accuracy, sweep.thresholds)]

    baselines = _evaluate_baselines(args, _baseline_names(args, spec), images, labels)
    result = {"model": spec.name, "backend": args.backend, "weights": str(args.weights or "default"),
              "dataset": args.dataset, "split": args.split if fashion else None, "images": int(len(labels)),
              "classes": classes, "exit_macs": costs, "anytime_accuracy": [float(a) for a in anytime],
              "calibration": calibration, "budgets": budgets, "static_baselines": baselines}

    out = sys.stderr if args.json == "-" else sys.stdout
    _print_evaluation(result, spec, split_name, out)
    emit_json(result, args.json)
    if args.plot:
        from .plots import accuracy_macs_plot

        where = f"{args.dataset} {split_name}, {len(labels)} images"
        accuracy_macs_plot(args.plot, spec.name, costs, result["anytime_accuracy"], budgets, baselines,
                           grids=[st.grid for st in spec.stages],
                           title=f"{spec.name} ({args.backend}) on {where}")
        print(f"wrote {args.plot}", file=out)
    if args.json not in (None, "-"):
        print(f"wrote {args.json}", file=out)
    return 0


def _print_evaluation(result: dict, spec, split_name: str, out) -> None:
    print(f"{result['model']} ({result['backend']}) on {result['dataset']} {split_name}: {result['images']} images",
          file=out)
    rows = [[exit_names(spec)[k], _mmacs(m), f"{a:.2f}%"]
            for k, (m, a) in enumerate(zip(result["exit_macs"], result["anytime_accuracy"]))]
    _table(["every image at", "MACs", "accuracy"], rows, out, right=[0])
    budgets = result["budgets"]
    if budgets:
        cal = result["calibration"]
        print(f"\nbudgeted early exit: {len(budgets)} budgets, thresholds from {cal['images']} {cal['data']}",
              file=out)
        pick = sorted({0, len(budgets) - 1, *range(4, len(budgets), 10)})
        rows = [[str(budgets[i]["budget"]), _mmacs(budgets[i]["macs"]), f"{budgets[i]['accuracy']:.2f}%",
                 ", ".join(f"{t:.3f}" for t in budgets[i]["thresholds"][:-1])] for i in pick]
        _table(["budget", "avg MACs", "accuracy", "thresholds"], rows, out, right=[3])
    if result["static_baselines"]:
        print("\nstatic baselines:", file=out)
        rows = []
        for b in result["static_baselines"]:
            reach = [x for x in budgets if x["accuracy"] >= b["accuracy"]]
            note = ""
            if reach:
                best = min(reach, key=lambda x: x["macs"])
                ratio = b["macs"] / max(best["macs"], 1.0)
                note = (f"DVT reaches it at {_mmacs(best['macs'])} MACs ("
                        + (f"{ratio:.2f}x fewer)" if ratio >= 1 else f"{1 / ratio:.2f}x more)"))
            elif budgets:
                note = f"DVT stays below it (best {max(x['accuracy'] for x in budgets):.2f}%)"
            rows.append([b["model"], _mmacs(b["macs"]), f"{b['accuracy']:.2f}%", note])
        _table(["model", "MACs", "accuracy", ""], rows, out, right=[0, 3])


# ---- calibrate ---------------------------------------------------------------------------------------

def _corner_policies(probs, labels, costs):
    """"Every image leaves at exit k" for each k: the cheapest and the plainest operating points, which
    the official budget sweep does not contain. Returns (thresholds, accuracy, cost) arrays."""
    from . import policy

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


def cmd_calibrate(args) -> int:
    from . import evaluation, policy
    from .checkpoints import format_for_suffix, read_checkpoint, write_checkpoint
    from .errors import CheckpointError

    if args.weights is None:
        raise UserError("name the checkpoint to calibrate with --weights FILE "
                        "(or --weights default --model NAME --out FILE)")
    if args.weights == "default":
        if args.model is None:
            raise UserError("--weights default needs --model NAME")
        from .weights import default_weights_path

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

    from .builder import resolve_spec

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
    write_checkpoint(dst, ckpt.canonical_state(spec.num_exits), meta, fmt=fmt, force=True)

    how = (f"budget index {chosen['budget_index']}" if "budget_index" in chosen else chosen["policy"])
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"{spec.name}: target {_mmacs(args.budget)} MACs -> {how}: thresholds {_fmt_thresholds(thresholds)}",
          file=out)
    print(f"on {len(labels)} calibration images: {chosen['holdout_accuracy']:.2f}% at "
          f"{_mmacs(chosen['holdout_macs'])} MACs on average; exits taken "
          f"{' / '.join(f'{s:.0%}' for s in shares)}", file=out)
    print(f"wrote {dst}", file=out)
    emit_json({"model": spec.name, "weights": str(dst), "thresholds": meta["thresholds"], **chosen}, args.json)
    return 0


# ---- predict -----------------------------------------------------------------------------------------

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


def _early_spec(args):
    """The spec --model and -O name, known before anything is built (None without --model)."""
    if getattr(args, "model", None) is None:
        return None
    return get_spec(args.model, **parse_overrides(getattr(args, "override", None)))


def _check_budget(budget: Optional[float], spec) -> None:
    if budget is None:
        return
    costs = exit_macs(spec)
    if not np.isfinite(budget) or budget < costs[0]:
        raise UserError(f"budget {budget:g} MACs is below the cheapest exit: every image runs exit 1, which "
                        f"costs {costs[0]} MACs ({_mmacs(costs[0])}); the cheapest achievable average is "
                        f"{costs[0]} MACs")


def _load_images(files, spec) -> np.ndarray:
    if spec.in_chans not in (1, 3):
        raise UserError(f"{spec.name} takes {spec.in_chans}-channel images; image files give 1 (grey) or 3 (RGB)")
    return np.stack([dvt_data.load_image(f, spec.img_size, spec.in_chans) for f in files])


def cmd_predict(args) -> int:
    from . import evaluation

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
    width = max(len(f) for f in files)
    for i, f in enumerate(files):
        k = int(res.exit_index[i])
        pred = int(res.prediction[i])
        label = classes[pred] if classes else str(pred)
        if args.json:
            print(json.dumps({"path": f, "prediction": label, "class_index": pred,
                              "confidence": round(float(res.confidence[i]), 6), "exit": k + 1,
                              "exits": spec.num_exits, "grid": spec.stages[k].grid, "macs": int(res.macs[i])}))
        else:
            print(f"{f.ljust(width)}  {label:<12}  {float(res.confidence[i]):6.1%}  {names[k]}  "
                  f"{_mmacs(int(res.macs[i]))} MACs")
    return 0


# ---- demo --------------------------------------------------------------------------------------------

DEMO_MODEL = "dvt_fashion_mnist"
DEMO_STATIC = "static_fashion_mnist_7x7"
DEMO_SAMPLES = 48
SUBSET_FILE = Path(__file__).resolve().parent / "assets" / "fashion_mnist_test_subset.npz"


def demo_samples(n: int = DEMO_SAMPLES):
    """The first ``n`` images, in test-set order, of the 1,000-image test subset shipped with dvt:
    (uint8 images, labels, test-set indices)."""
    if not SUBSET_FILE.exists():
        raise UserError(f"the demo images are missing ({SUBSET_FILE}); reinstall dvt, or run `dvt demo --full`")
    with np.load(SUBSET_FILE) as d:
        order = np.argsort(d["indices"], kind="stable")[:n]
        return d["images"][order], d["labels"][order].astype(np.int64), d["indices"][order].astype(np.int64)


def _reference_numbers() -> Optional[str]:
    """Full-test-set numbers stored in the shipped weights' metadata (None when unavailable)."""
    from .checkpoints import read_checkpoint
    from .weights import default_weights_path

    try:
        dvt = read_checkpoint(default_weights_path(DEMO_MODEL, verify=False)).meta
        static = read_checkpoint(default_weights_path(DEMO_STATIC, verify=False)).meta
        op = dvt["default_operating_point"]
        s_acc = static["test_anytime_accuracy"][-1]
        s_macs = exit_macs(get_spec(DEMO_STATIC))[-1]
        return (f"on the full test set (10,000 images, from the weights' metadata): DVT at its default thresholds "
                f"{op['test_accuracy']:.2f}% "
                f"at {_mmacs(op['test_macs'])} MACs, {DEMO_STATIC} {s_acc:.2f}% at {_mmacs(s_macs)} MACs")
    except (DVTError, KeyError, IndexError, TypeError, OSError):
        return None


def cmd_demo(args) -> int:
    from types import SimpleNamespace

    from . import evaluation

    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit must be 0 or more, got {args.limit}")
    ns = SimpleNamespace(model=DEMO_MODEL, weights="default", override=None, backend=args.backend,
                         device=args.device)
    model = build_from_args(ns)
    spec, meta = model.spec, _meta(model)
    if args.full:
        images, labels = dvt_data.load_fashion_mnist("test")
        index = np.arange(len(labels))
        what = f"the whole Fashion-MNIST test set ({len(labels)} images)"
    else:
        images, labels, index = demo_samples()
        what = (f"{len(labels)} sample test images shipped with dvt (run `dvt demo --full` for the whole "
                "Fashion-MNIST test set)")
    thresholds, how = choose_thresholds(args, spec, meta, "the shipped weights")
    res = evaluation.adaptive(model, images, thresholds, progress=_progress())
    classes = _class_names(meta, spec.num_classes) or list(dvt_data.FASHION_MNIST_CLASSES)
    names = exit_names(spec)
    n = len(labels)
    correct = res.prediction == labels
    accuracy = float(correct.mean() * 100)
    mean_macs = res.mean_macs
    static_macs = exit_macs(get_spec(DEMO_STATIC))[-1]
    shares = res.exit_counts / n

    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"{DEMO_MODEL} ({args.backend}, shipped weights) on {what}", file=out)
    print(f"thresholds {_fmt_thresholds(thresholds)} ({how})", file=out)
    rows_limit = args.limit if args.limit is not None else (n if not args.full else DEMO_SAMPLES)
    if rows_limit:
        rows = [[str(int(index[i])), classes[int(res.prediction[i])], classes[int(labels[i])],
                 names[int(res.exit_index[i])], f"{float(res.confidence[i]):.1%}", _mmacs(int(res.macs[i])),
                 "" if correct[i] else "wrong"] for i in range(min(rows_limit, n))]
        print(file=out)
        _table(["idx", "prediction", "true label", "exit taken", "confidence", "MACs", ""], rows, out,
               right=[1, 2, 3, 6])
        if rows_limit < n:
            print(f"... {n - rows_limit} more images (--limit N shows more rows)", file=out)
    print(file=out)
    print(f"accuracy: {accuracy:.2f}% ({int(correct.sum())}/{n})", file=out)
    print(f"average MACs per image: {_mmacs(mean_macs)} vs {_mmacs(static_macs)} for the static full-grid model "
          f"{DEMO_STATIC} ({mean_macs / static_macs:.2f}x, {static_macs / mean_macs:.2f}x fewer)", file=out)
    print("exits taken: " + ", ".join(f"{names[k]} {shares[k]:.0%} ({int(res.exit_counts[k])})"
                                      for k in range(spec.num_exits)), file=out)
    ref = _reference_numbers()
    if ref:
        print(ref, file=out)

    pred_names = [classes[int(p)] for p in res.prediction]
    true_names = [classes[int(y)] for y in labels]
    if args.out:
        from .plots import exit_gallery

        exit_gallery(args.out, images, res.exit_index, pred_names, true_names, names,
                     title=f"{DEMO_MODEL}: {n} test images by exit taken ({accuracy:.1f}% correct, "
                           f"{_mmacs(mean_macs)} MACs on average vs {_mmacs(static_macs)} static)")
        print(f"wrote {args.out}", file=out)
    emit_json({"model": DEMO_MODEL, "backend": args.backend, "images": n, "full": bool(args.full),
               "thresholds": [float(t) for t in thresholds], "accuracy": accuracy, "mean_macs": mean_macs,
               "static_model": DEMO_STATIC, "static_macs": static_macs, "macs_ratio": mean_macs / static_macs,
               "exit_names": names, "exit_counts": [int(c) for c in res.exit_counts],
               "exit_shares": [float(s) for s in shares],
               "per_image": [{"index": int(index[i]), "prediction": pred_names[i], "label": true_names[i],
                              "exit": int(res.exit_index[i]) + 1, "confidence": float(res.confidence[i]),
                              "macs": int(res.macs[i])} for i in range(n)]}, args.json)
    if args.json not in (None, "-"):
        print(f"wrote {args.json}", file=out)
    return 0
