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

from dvt_core.data.datasets import model_classes
from dvt_core.checkpoint.registry import has_shipped_weights, is_shipped_file  # noqa: F401  (for the commands)
from dvt_core.errors import ArgumentError, DVTError
from dvt_core.runtime.operating_point import check_budget, choose_thresholds as _choose_thresholds, exit_costs, parse_macs
from dvt_core.model.zoo import get_spec


def parse_overrides(items: Optional[Sequence[str]]) -> dict:
    """``["num_classes=10", "grids=[2,4,7]"]`` -> dict: :func:`dvt_core.schema.parse_overrides` (typed, not YAML)."""
    from dvt_core.schema import parse_overrides as parse

    return parse(items)


def add_common_options(p: argparse.ArgumentParser, model: bool = True, weights: bool = True,
                       precision: bool = True) -> None:
    """--backend and --device; with ``model`` --model and -O; with ``weights`` --weights; with
    ``precision`` --precision."""
    from dvt_core.runtime.contract import runtime_names

    exports = f", or {' / '.join(runtime_names('export'))} to run a `dvt export` folder given as --weights"
    p.add_argument("--backend", default="torch",  # without --weights there is no export folder to run
                   help=f"{' or '.join(runtime_names('spec'))}{exports if weights else ''}")
    p.add_argument("--device", default=None,
                   help="torch device (cpu, cuda, cuda:1, mps) or MindSpore target (default: the backend's, cpu)")
    if precision:
        add_precision_option(p)
    if model:
        p.add_argument("--model", default=None, help="zoo model name (see `dvt flops --list`)")
        p.add_argument("--override", "-O", action="append", metavar="KEY=VALUE",
                       help="spec override, e.g. -O num_classes=10 -O grids=[2,4,7] (repeatable)")
    if weights:
        p.add_argument("--weights", default=None,
                       help="checkpoint file (.pth.tar, .pth, .safetensors, .ckpt), a `dvt export` folder, or "
                            "'default' (the shipped weights; also what --model alone uses when they exist)")
        p.add_argument("--sha256", default=None, metavar="HEX",
                       help="refuse --weights FILE unless its SHA-256 is this (shipped weights are always checked)")
        p.add_argument("--allow-lossy-cast", action="store_true",
                       help="accept weights whose dtype cast to float32 changes values (int, out-of-range float64)")
        p.add_argument("--trust-native-code", action="store_true",
                       help="open a pt2 export folder given as --weights: its packages run native code when loaded, "
                            "so only folders you made or trust")


def add_precision_option(p: argparse.ArgumentParser) -> None:
    from dvt_core.runtime.contract import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="dtype the model computes in (default fp32); bf16 is fast on CPUs with AVX512-BF16 / AMX")


def add_force_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="overwrite existing output files")


def check_outputs(args, *paths) -> None:
    """Refuse, before any work, an output file that exists (without --force) or cannot be written."""
    from dvt_core import fileio

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
    from dvt_core.checkpoint.files import atomic_path

    with atomic_path(Path(dest), force=force, parents=False) as tmp:
        tmp.write_text(text + "\n")


def show_progress() -> bool:
    """Progress bars only for a person watching (stderr is a terminal)."""
    return sys.stderr.isatty()


def check_limit(value: Optional[int], option: str) -> Optional[int]:
    if value is not None and value < 1:
        raise ArgumentError(f"{option} must be at least 1, got {value}")
    return value


def plots_available() -> bool:
    """Whether matplotlib (the ``dvt[plots]`` extra) is installed."""
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # an import hook that refuses it: not usable either
        return False


def check_picture(path) -> None:
    """Before any work: refuse a picture path whose suffix names no format a picture is written in, or a
    picture at all without matplotlib."""
    from dvt_core.cli.plots import PLOT_FORMATS

    if path and Path(path).suffix.lower() not in PLOT_FORMATS:
        raise ArgumentError(f"cannot write a picture to {path}: name it {', '.join(PLOT_FORMATS)}")
    if path and not plots_available():
        raise ArgumentError(f"writing the picture {path} needs matplotlib, which is not installed: "
                        "pip install 'dvt[plots]'")


def resolve_weights(args) -> str:
    """--weights as given; without it the shipped weights of --model, else an error (random weights
    would give meaningless results)."""
    if args.weights is not None:
        return args.weights
    if args.model is None:
        raise ArgumentError("name a model with --model (see `dvt flops --list`) or a checkpoint with --weights FILE")
    get_spec(args.model)  # unknown model: say so first
    if has_shipped_weights(args.model):
        return "default"
    raise ArgumentError(f"no weights ship for {args.model}; pass --weights FILE (a trained checkpoint)")


def build_from_args(args, weights=None):
    """The model named by --model/--weights/--override for --backend, on --device."""
    from dvt_core.runtime.builder import build, get_backend
    from dvt_core.errors import CheckpointError

    overrides = parse_overrides(getattr(args, "override", None))
    weights = weights if weights is not None else getattr(args, "weights", None)
    if args.model is None and weights in (None, "default"):
        raise ArgumentError("name a model with --model (see `dvt flops --list`)")
    # Cheap checks first, so a mistake is reported before a framework is imported.
    if args.model is not None:
        get_spec(args.model)  # an unknown name is reported as such, before any weights are looked up
    from dvt_core.checkpoint.registry import check_weights

    check_weights(args.model, weights, getattr(args, "sha256", None))  # exists, regular, SHA-256, ships
    get_backend(args.backend)
    check_device(args.backend, args.device)
    try:
        model = build(args.model, backend=args.backend, weights=weights,
                      allow_lossy_cast=bool(getattr(args, "allow_lossy_cast", False)),
                      precision=getattr(args, "precision", None) or "fp32",
                      trust_native_code=bool(getattr(args, "trust_native_code", False)), **overrides)
    except CheckpointError as exc:
        problems = exc.missing or exc.unexpected or exc.mismatched
        if not problems:
            raise
        counts = ", ".join(f"{len(v)} {k}" for k, v in (("missing", exc.missing), ("unexpected", exc.unexpected),
                                                            ("mismatched", exc.mismatched)) if v)
        want = args.model or "the model it names"
        raise ArgumentError(f"{weights} does not fit {want} ({counts} tensors, e.g. {problems[0]}); "
                        "is it the checkpoint of another model, or does it need -O overrides?") from None
    return to_device(model, args.backend, args.device)


def to_device(model, backend: str, device):
    """The model on ``device`` (the backend knows its devices); InputError for one it does not have."""
    if device is None:
        return model
    from dvt_core.runtime.builder import get_backend

    return get_backend(backend).to_device(model, device)


def check_device(backend: str, device) -> None:
    """Before any work: InputError for a --device the backend cannot use here (None: its default)."""
    if device is None:
        return
    from dvt_core.runtime.builder import get_backend

    get_backend(backend).device_for(device)


def model_meta(model) -> dict:
    return dict(getattr(model, "checkpoint_meta", None) or {})


def model_class_names(meta: dict, num_classes: int) -> Optional[list]:
    return model_classes(meta, num_classes)


def exit_names(spec) -> list[str]:
    """``exit 1/3 (2x2 tokens)`` per exit."""
    n = spec.num_exits
    return [f"exit {k + 1}/{n} ({st.grid}x{st.grid} tokens)" for k, st in enumerate(spec.stages)]


def fmt_threshold(t, digits: int = 4) -> str:
    """One threshold as a person reads it: the never / always sentinels spelled out, not 100000000.000."""
    t = float(t)
    return "1e8 (none leave)" if t >= 1e8 else "-1e8 (all leave)" if t <= -1e8 else f"{t:.{digits}f}"


def format_thresholds(thresholds) -> str:
    """All thresholds but the last (which takes every image left), sentinels spelled out."""
    return ", ".join(fmt_threshold(t) for t in list(thresholds)[:-1]) or "-"


def format_mmacs(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def print_table(header: list[str], rows: list[list[str]], file=None, right=None) -> None:
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
    """``"0.9,0.8"`` -> float32 thresholds for every exit (the last one is -1e8: everything left leaves).

    Exactly one value per exit but the last: the last exit takes every image left, so a value for it would
    mean nothing and is refused rather than dropped. ``inf`` keeps every image at that exit going on."""
    from dvt_core.runtime.early_exit import normalize_thresholds

    want = num_exits - 1
    example = ",".join(["0.9"] * max(want, 1))
    if not str(text).strip():
        raise ArgumentError(f"--thresholds is empty; give {want} comma-separated confidences "
                        f"(one per exit but the last), e.g. --thresholds {example}")
    items = [v for v in text.replace(" ", "").split(",")]
    try:
        values = [float(v) for v in items]
    except ValueError:
        raise ArgumentError(f"--thresholds must be comma-separated numbers, got {text!r}") from None
    bad = [item for item, v in zip(items, values) if v != v]
    if bad:
        raise ArgumentError(f"--thresholds {text!r}: {bad[0]!r} is not a confidence (use numbers; inf: no image "
                        "leaves at that exit)")
    if len(values) != want:
        raise ArgumentError(f"--thresholds {text!r} gives {len(values)} value(s); this model has {num_exits} exits and "
                        f"takes {want} (one per exit but the last, which takes every image left), e.g. "
                        f"--thresholds {example}")
    try:
        return normalize_thresholds(values, num_exits)
    except DVTError as exc:
        raise ArgumentError(f"--thresholds: {exc}") from None


def parse_budget(text: str) -> float:
    """argparse type of --budget: ``5e6``, ``5M``, ``300K``, ``1.2G`` (the form the output prints)."""
    try:
        return parse_macs(text)
    except DVTError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def choose_thresholds(args, spec, meta: dict, source: str) -> tuple[np.ndarray, str]:
    """Thresholds from --thresholds, --budget, or the checkpoint's own; and a phrase saying which."""
    text = getattr(args, "thresholds", None)
    given = None if text is None or spec.num_exits == 1 else parse_thresholds(text, spec.num_exits)
    return _choose_thresholds(spec, meta, source, thresholds=given, budget=getattr(args, "budget", None))


def exit_macs(spec) -> list[int]:
    return exit_costs(spec)


def early_spec(args):
    """The spec --model and -O name, known before anything is built (None without --model)."""
    if getattr(args, "model", None) is None:
        return None
    return get_spec(args.model, **parse_overrides(getattr(args, "override", None)))


def check_budget_option(budget: Optional[float], spec) -> None:
    check_budget(budget, spec)


def parse_latency(text: str) -> float:
    """argparse type of --latency-budget: ``0.4ms``, ``400us``, ``0.0004s`` (a bare number is ms), in seconds."""
    from dvt_core.runtime.cost_model import parse_latency as parse

    try:
        return parse(text)
    except DVTError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def latency_costs(meta: dict, runtime: str, precision: str, batch: int, source: str):
    """``seconds_of(exit shares)``: the expected seconds per image of an operating point under the cost profile
    ``meta`` stores for ``runtime`` at ``precision`` and ``batch``; a one-line error when there is none, or it
    was measured for another."""
    from dvt_core.runtime import cost_model

    profile = cost_model.stored_profile(meta, runtime, precision, source)
    row = cost_model.batch_row(profile, batch, f"the cost profile in {source}")
    return lambda shares: cost_model.expected_seconds(row, shares)


def latency_thresholds(args, spec, meta: dict, source: str, batch: int) -> tuple[np.ndarray, str]:
    """The calibrated operating point whose expected time per image under the stored cost profile (this
    runtime, precision and ``batch``) meets --latency-budget; and a phrase saying which."""
    from dvt_core.runtime.early_exit import normalize_thresholds
    from dvt_core.runtime.operating_point import latency_operating_point

    costs = latency_costs(meta, args.backend, args.precision, batch, source)
    op = latency_operating_point(meta, args.latency_budget, spec, costs, source)
    chosen = op["policy"] or f"calibrated budget #{op['budget_index']}"
    acc = f"{op['expected_accuracy']:.2f}% at " if op["expected_accuracy"] is not None else ""
    what = (f"latency budget {args.latency_budget * 1e3:.4g} ms -> {chosen}; held-out: {acc}"
            f"{op['expected_seconds'] * 1e3:.4g} ms per image expected ({args.backend} {args.precision}, batch {batch})")
    return normalize_thresholds(op["thresholds"], spec.num_exits), what
