"""Helpers every ``dvt`` subcommand shares: user errors, common options, building the model the options
name, thresholds, tables. No subcommand logic lives here."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .. import data as dvt_data
from ..errors import DVTError
from ..zoo import get_spec


class UserError(DVTError):
    """A problem with what the user asked for; printed as one line."""


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def parse_overrides(items: Optional[Sequence[str]]) -> dict:
    """``["num_classes=10", "grids=[2,4,7]"]`` -> dict (values parsed as YAML scalars/lists)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise UserError(f"override {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


def add_common_options(p: argparse.ArgumentParser, model: bool = True, weights: bool = True) -> None:
    """--backend and --device; with ``model`` --model and -O; with ``weights`` --weights."""
    p.add_argument("--backend", default="torch",
                   help="torch (default), mindspore, or onnx / mindir to run a `dvt export` folder given as --weights")
    p.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:1, mps) or MindSpore target")
    if model:
        p.add_argument("--model", default=None, help="zoo model name (see `dvt flops --list`)")
        p.add_argument("--override", "-O", action="append", metavar="KEY=VALUE",
                       help="spec override, e.g. -O num_classes=10 -O grids=[2,4,7] (repeatable)")
    if weights:
        p.add_argument("--weights", default=None,
                       help="checkpoint file (.pth.tar, .pth, .safetensors, .ckpt) or 'default'")
        p.add_argument("--sha256", default=None, metavar="HEX",
                       help="refuse --weights FILE unless its SHA-256 is this (shipped weights are always checked)")
        p.add_argument("--allow-lossy-cast", action="store_true",
                       help="accept weights whose dtype cast to float32 changes values (int, out-of-range float64)")


def add_force_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="overwrite existing output files")


def check_outputs(args, *paths) -> None:
    """Refuse, before any work, an output file that exists (without --force) or cannot be written."""
    from .. import fileio

    for path in paths:
        if path not in (None, "", "-"):
            fileio.check_writable(path, force=bool(getattr(args, "force", False)))


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_text(text) -> str:
    """``text`` with control characters (terminal escapes, newlines, ...) shown as ``\\xNN`` escapes,
    for text output: a class name or a file name can never forge a line or drive the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", str(text))


def emit_json(obj, dest: Optional[str], force: bool = False) -> None:
    """Write ``obj`` as JSON to ``dest`` ('-' = stdout) atomically; an existing file needs ``force``."""
    if dest is None:
        return
    text = json.dumps(obj, indent=2)
    if dest == "-":
        print(text)
        return
    from ..checkpoints import atomic_path

    with atomic_path(Path(dest), force=force, parents=False) as tmp:
        tmp.write_text(text + "\n")


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
    from ..training import TrainConfig

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
    from ..weights import shipped_models

    try:
        return name in shipped_models()
    except DVTError:
        return False


def _is_shipped_file(path) -> bool:
    """True when ``path`` is one of the weight files this project ships (their SHA-256 is registered)."""
    from ..weights import registry, weights_dir

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
    from ..builder import build, get_backend
    from ..errors import CheckpointError

    overrides = parse_overrides(getattr(args, "override", None))
    weights = weights if weights is not None else getattr(args, "weights", None)
    if args.model is None and weights in (None, "default"):
        raise UserError("name a model with --model (see `dvt flops --list`)")
    # Cheap checks first, so a mistake is reported before a framework is imported.
    if args.model is not None:
        get_spec(args.model)  # an unknown name is reported as such, before any weights are looked up
    if weights is not None and str(weights) != "default" and not Path(weights).exists():
        raise UserError(f"weights file not found: {weights}")
    if getattr(args, "sha256", None):
        if weights is None or str(weights) == "default":
            raise UserError("--sha256 checks an explicit --weights FILE (shipped weights are always checked)")
        from ..weights import verify_sha256

        verify_sha256(weights, args.sha256)
    if str(weights) == "default":
        from ..weights import default_weights_path

        default_weights_path(args.model, verify=False)  # no weights ship for this model: say so now
    get_backend(args.backend)
    try:
        model = build(args.model, backend=args.backend, weights=weights,
                      allow_lossy_cast=bool(getattr(args, "allow_lossy_cast", False)), **overrides)
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
    from ..builder import get_backend

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
    header = [escape_text(h) for h in header]
    rows = [[escape_text(c) for c in r] for r in rows]  # names from a checkpoint never reach the terminal raw
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    left = set(right or ())

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(fmt(header).rstrip(), file=file)
    for r in rows:
        print(fmt(r).rstrip(), file=file)


def parse_thresholds(text: str, num_exits: int) -> np.ndarray:
    """``"0.9,0.8"`` -> float32 thresholds for every exit (the last one is -1e8: everything left leaves)."""
    from ..early_exit import normalize_thresholds

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
    from ..early_exit import normalize_thresholds

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
    from ..macs import exit_macs as _exit_macs

    return [int(m) for m in _exit_macs(spec)]


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
