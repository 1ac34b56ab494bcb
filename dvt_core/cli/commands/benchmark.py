"""``dvt benchmark``: wall-clock of true early exit against every exit, the static backbone and timm
(``--backend torch``), or of ONNX Runtime adaptive against torch eager adaptive (``--backend onnx``).

Conventions of timm's ``benchmark.py``: random images, warm-up runs, then timed runs; ms per image and
images per second, best and median. The variants are timed interleaved (one run of each per round,
``--repeats`` rounds), so that a change in machine load hits them alike: read the ratios, measured
within one run. Thresholds come from ``--split`` (the share of the images leaving at each exit, found
on the very images timed) or ``--budget`` (average MACs per image).

``--backend onnx`` exports the torch model (random weights, or ``--weights``) per stage into a temporary
folder with :func:`dvt_core.export.writer.export_model`, loads it with ``dvt_core.build(DIR, backend="onnx")``
and times both runtimes' ``adaptive`` with the same thresholds on the same images.
"""
from __future__ import annotations

import sys

import numpy as np

from dvt_core.cli.commands._shared import UserError, add_force_option, check_device, check_outputs, emit_json, parse_overrides
from dvt_core.schema import MAX_BENCH_BATCH, MAX_SEED, number

HELP = ("time adaptive inference against all exits, the static backbone and timm, or ONNX Runtime against "
        "torch eager (ratios measured in one run)")

BACKENDS = ("torch", "onnx")



def add_arguments(parser) -> None:
    parser.add_argument("model", help="zoo model name (see `dvt flops --list`)")
    parser.add_argument("--override", "-O", action="append", metavar="KEY=VALUE", help="spec override (repeatable)")
    parser.add_argument("--backend", default="torch", metavar="{torch,onnx}",
                        help="torch: adaptive against all exits, static and timm; onnx: ONNX Runtime adaptive "
                             "(per-stage export) against torch eager adaptive")
    parser.add_argument("--weights", default=None, metavar="F|default",
                        help="checkpoint for the DVT (default: random weights; timing does not depend on them)")
    parser.add_argument("--batch-sizes", type=number("int", 1, MAX_BENCH_BATCH), nargs="+", default=[1, 64], metavar="B")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--split", type=number("float", 0, 1), nargs="+", default=None, metavar="SHARE",
                   help="share of the images leaving at each exit (default 0.6 0.25 0.15 for three exits)")
    g.add_argument("--budget", type=number("float", 0, low_open=True), default=None, metavar="MACS",
                   help="average MACs per image; the shares follow the paper's budget rule")
    parser.add_argument("--images", type=number("int", 1, 1 << 20), default=32,
                        help="images per timed run at each batch size (at least one batch; default 32)")
    parser.add_argument("--repeats", type=number("int", 1, 10_000), default=3, help="timed rounds (best and median over them)")
    parser.add_argument("--warmup", type=number("int", 0, 10_000), default=1, help="untimed rounds first (compilation happens there)")
    parser.add_argument("--threads", type=number("int", 1, 4096), default=None,
                        help="torch CPU threads, and ONNX Runtime intra-op threads with --backend onnx")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps); onnx: cpu or cuda")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every model first (dynamic shapes); torch backend")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast to this dtype; torch backend")
    parser.add_argument("--no-timm", action="store_true", help="leave timm's model out even when importable")
    parser.add_argument("--seed", type=number("int", 0, MAX_SEED), default=0)
    parser.add_argument("--json", default=None, metavar="F", help="write the figures as JSON ('-' for stdout)")
    add_force_option(parser)


def _shares(args, spec, costs) -> np.ndarray:
    from dvt_core.runtime import policy

    n = spec.num_exits
    if args.budget is not None:
        if not costs[0] <= args.budget <= costs[-1]:
            raise UserError(f"--budget {args.budget:g} MACs is outside what {spec.name} can spend "
                            f"({costs[0]} to {costs[-1]} MACs per image)")
        lo, hi = 1e-4, 1e4  # budget_fractions(p): higher p, later exits, more MACs
        for _ in range(100):
            mid = (lo * hi) ** 0.5
            if float(policy.budget_fractions(mid, n) @ np.asarray(costs, np.float64)) < args.budget:
                lo = mid
            else:
                hi = mid
        return policy.budget_fractions(lo, n).astype(np.float64)
    split = args.split if args.split is not None else ([0.6, 0.25, 0.15] if n == 3 else [1.0 / n] * n)
    if len(split) != n or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
        raise UserError(f"--split needs {n} non-negative shares summing to 1 for {spec.name}, got {split}")
    return np.asarray(split, np.float64)


def _check_args(args) -> None:
    if args.backend not in BACKENDS:
        other = {"mindspore": "time MindSpore with benchmarks/bench_mindspore.py",
                 "mindir": "time MindIR graphs with `dvt evaluate --backend mindir`"}.get(args.backend, "")
        raise UserError(f"dvt benchmark times --backend torch or onnx, not {args.backend!r}"
                        + (f" ({other})" if other else ""))
    if args.backend == "onnx":
        for flag, on in (("--compile", args.compile), ("--amp", args.amp)):
            if on:
                raise UserError(f"{flag} is for --backend torch: with --backend onnx both runtimes run float32")
    for name in ("images", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be 1 or more, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {args.warmup}")
    if any(b < 1 for b in args.batch_sizes):
        raise UserError(f"--batch-sizes must be 1 or more, got {args.batch_sizes}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be 1 or more, got {args.threads}")


def run(args) -> int:
    import argparse

    import dvt_core
    from dvt_backends.torch import benchmark as torch_side  # the framework side of this command

    from dvt_core.model.zoo import get_spec
    from dvt_core.cli.commands._shared import build_from_args

    _check_args(args)
    check_outputs(args, args.json)
    spec = get_spec(args.model, **parse_overrides(args.override))
    shares = _shares(args, spec, dvt_core.exit_macs(spec))
    device = torch_side.benchmark_device(args.device, args.threads)
    if args.backend == "onnx":
        check_device("onnx", device.type)  # onnxruntime importable, with a provider for the device
    torch_args = argparse.Namespace(**{**vars(args), "backend": "torch", "device": "cpu"})

    def make_model():
        return build_from_args(torch_args)

    out = sys.stdout if args.json != "-" else sys.stderr
    runner = torch_side.run_onnx if args.backend == "onnx" else torch_side.run_torch
    report = runner(args, make_model, shares, device, out)
    emit_json(report, args.json, force=getattr(args, "force", False))
    return 0
