"""``dvt benchmark``: does early exit pay? For each runtime (torch, ONNX Runtime, OpenVINO) and precision,
true early exit against the same runtime's static backbone (and timm's, when importable) at each batch size,
each stage's MACs per second against the static model's, and streaming early exit as a mode.

Conventions of timm's ``benchmark.py``: warm-up runs, then timed runs; ms per image and images per second,
best and median. The variants are timed interleaved (one run of each per round, ``--repeats`` rounds), so
that a change in machine load hits them alike: read the ratios, measured within one run. Thresholds: the
checkpoint's stored operating point when ``--weights`` has one, else ``--split`` (the share of the images
leaving at each exit, found on the very images timed; 60 / 25 / 15 % for three exits) or ``--budget``.
The last line says whether early exit pays. One function per mode (``MODE_PRINTERS``); the timing is
written over the runtime contract in ``dvt_core.bench.benchmarking``.
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile

import numpy as np

from dvt_core.cli.commands._shared import (add_force_option, check_outputs, emit_json, escape_text, parse_budget,
                                           parse_overrides)
from dvt_core.errors import ArgumentError
from dvt_core.bench.benchmarking import MODES, RUNTIMES
from dvt_core.runtime.cost_model import cpu_info
from dvt_core.schema import MAX_BENCH_BATCH, MAX_SEED, number

HELP = ("does early exit pay? adaptive inference against the same runtime's static backbone, per runtime and "
        "precision (ratios measured in one run)")


def add_arguments(parser) -> None:
    from dvt_core.runtime.contract import PRECISIONS

    parser.add_argument("model", help="zoo model name (see `dvt flops --list`)")
    parser.add_argument("--override", "-O", action="append", metavar="KEY=VALUE", help="spec override (repeatable)")
    parser.add_argument("--backend", nargs="+", default=["torch"], metavar="RUNTIME",
                        help=f"runtimes to time, each against its own static backbone: {', '.join(RUNTIMES)}")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS, metavar="P",
                        help=f"precisions to time ({', '.join(PRECISIONS)}; default fp32)")
    parser.add_argument("--weights", default=None, metavar="F|default|DIR",
                        help="checkpoint (its stored operating point is used), or an export folder for onnx / "
                             "openvino (the static model's export beside it, else exported on the fly); "
                             "default: random weights, timing does not depend on them")
    parser.add_argument("--trust-native-code", action="store_true",
                        help="open a pt2 export folder given as --weights (its packages run native code when loaded: "
                             "only folders you made or trust); folders the benchmark compiles itself need no flag")
    parser.add_argument("--batch-sizes", type=number("int", 1, MAX_BENCH_BATCH), nargs="+", default=[1, 64], metavar="B",
                        help="batch sizes to time, one table each")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--split", type=number("float", 0, 1), nargs="+", default=None, metavar="SHARE",
                   help="share of the images leaving at each exit (default: the checkpoint's operating point, "
                        "else 0.6 0.25 0.15 for three exits)")
    g.add_argument("--budget", type=parse_budget, default=None, metavar="MACS",
                   help="average MACs per image (5e6, 3.1M, 1.2G): the checkpoint's calibrated point for it, "
                        "else shares following the paper's budget rule")
    parser.add_argument("--modes", nargs="+", default=["adaptive", "stages"], choices=MODES, metavar="MODE",
                        help=f"what to time: {', '.join(MODES)} (default adaptive stages)")
    parser.add_argument("--images", type=number("int", 1, 1 << 20), default=32,
                        help="images per timed run at each batch size (at least one batch; default 32)")
    parser.add_argument("--repeats", type=number("int", 1, 10_000), default=3, help="timed rounds (best and median over them)")
    parser.add_argument("--warmup", type=number("int", 0, 10_000), default=1, help="untimed rounds first (compilation happens there)")
    parser.add_argument("--threads", type=number("int", 1, 4096), default=None, help="CPU threads of every runtime")
    parser.add_argument("--device", default="cpu", help="device (cpu, cuda, ...); the runtime must have it")
    parser.add_argument("--compile", action="store_true", help="torch.compile the torch models first")
    parser.add_argument("--no-timm", action="store_true", help="leave timm's model out even when importable")
    parser.add_argument("--seed", type=number("int", 0, MAX_SEED), default=0)
    parser.add_argument("--json", default=None, metavar="F", help="write the figures as JSON ('-' for stdout)")
    add_force_option(parser)
    # --serve: the HTTP service under load (dvt_core.bench.loadtest), its own mode
    parser.add_argument("--serve", action="store_true",
                        help="load-test `dvt serve` on 127.0.0.1 with the `hey` load generator (apt-get install hey): "
                             "adaptive against every stage and the static model, one-image /v1 and many-image /v2 "
                             "requests (dvt_fashion_mnist; --threads per server, --repeats rounds)")
    parser.add_argument("--concurrency", type=number("int", 1, 1024), nargs="+", default=[1, 16], metavar="N",
                        help="with --serve: concurrent clients of each load run")
    parser.add_argument("--requests", type=number("int", 1, 1_000_000), default=400,
                        help="with --serve: images per load run (default 400)")
    parser.add_argument("--images-per-request", type=number("int", 1, 1024), default=64,
                        help="with --serve: images in each /v2 request of the many-image runs (default 64)")


def _check_args(args) -> None:
    bad = [b for b in args.backend if b not in RUNTIMES]
    if bad:
        other = {"mindspore": "time MindSpore with benchmarks/bench_mindspore.py",
                 "mindir": "time MindIR graphs with `dvt evaluate --backend mindir`"}.get(bad[0], "")
        raise ArgumentError(f"dvt benchmark times {', '.join(RUNTIMES)}, not {bad[0]!r}" + (f" ({other})" if other else ""))
    if args.compile and args.backend != ["torch"]:
        raise ArgumentError("--compile is for the torch runtime alone (--backend torch)")
    for name in ("images", "repeats"):
        if getattr(args, name) < 1:
            raise ArgumentError(f"--{name} must be 1 or more, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ArgumentError(f"--warmup must be 0 or more, got {args.warmup}")
    if any(b < 1 for b in args.batch_sizes):
        raise ArgumentError(f"--batch-sizes must be 1 or more, got {args.batch_sizes}")
    if args.threads is not None and args.threads < 1:
        raise ArgumentError(f"--threads must be 1 or more, got {args.threads}")


def _shares(args, spec, costs) -> np.ndarray:
    """The exit shares of --split / --budget (no calibration in the checkpoint), checked."""
    from dvt_core.runtime import policy

    n = spec.num_exits
    if args.budget is not None:
        if not costs[0] <= args.budget <= costs[-1]:
            raise ArgumentError(f"--budget {args.budget:g} MACs is outside what {spec.name} can spend "
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
        raise ArgumentError(f"--split needs {n} non-negative shares summing to 1 for {spec.name}, got {split}")
    return np.asarray(split, np.float64)


def _operating_point(args, model):
    """(fixed thresholds or None, shares or None, phrase): the checkpoint's point unless --split / --budget say
    otherwise (a --budget the checkpoint has calibrated picks its calibrated point)."""
    from dvt_core.errors import DVTError
    from dvt_core.runtime.operating_point import choose_thresholds, format_macs

    meta = getattr(model, "checkpoint_meta", None) or {}
    if args.split is None and meta.get("thresholds") is not None:
        try:
            t, what = choose_thresholds(model.spec, meta, "the checkpoint", budget=args.budget)
            return t, None, what
        except DVTError:
            if args.budget is None:
                raise
    shares = _shares(args, model.spec, model.exit_macs)
    what = (f"--budget {format_macs(args.budget)} MACs" if args.budget is not None else "--split" if args.split
            else "the default split") + f": exit shares {np.round(shares, 3).tolist()}"
    return None, shares, what


def _macs(n: float, scale: float) -> str:
    return f"{n / scale:.3g}" if scale < 1e9 else f"{n / scale:.3f}"


def _unit(spec_macs) -> tuple[float, str]:
    """The unit that fits the model's MACs: M for the shipped model, G for ImageNet-size ones."""
    return (1e9, "G") if max(spec_macs) >= 1e9 else (1e6, "M")


def _print_block(title: str, header: str, lines, out) -> None:
    """One mode's results: a blank line and its title, the column header, a line per variant."""
    print(f"\n{title}", file=out)
    print(header, file=out)
    for line in lines:
        print(line, file=out)


def print_adaptive(row, label, unit, out) -> None:
    scale, u = unit
    width = max(len(k) for k in row["variants"])

    def line(k, v) -> str:
        tail = ("" if "predicted_speedup" not in v else
                f"  {v['predicted_speedup']:25.2f}x {v['realised_speedup']:8.2f}x {v['ratio']:6.2f}")
        return (f"  {k:{width}}  {v['ms_per_image_best']:11.3f} {v['ms_per_image_median']:7.3f} "
                f"{v['images_per_s_best']:8.1f} {_macs(v['macs_per_image'], scale):>6}{tail}")
    _print_block(f"{label}, batch {row['batch']}: {row['images']} images, exit shares "
                 f"{np.round(row['exit_shares'], 3).tolist()}, mean {_macs(row['mean_macs'], scale)} {u}MACs/image",
                 f"  {'':{width}}  ms/img best  median    img/s  {u}MACs  adaptive speed-up: predicted  realised  ratio",
                 (line(k, v) for k, v in row["variants"].items()), out)


def print_stages(row, label, unit, out) -> None:
    scale, u = unit

    def line(k, v) -> str:
        tail = ("" if "ms_per_image_in_cascade" not in v else
                f"  {v['ms_per_image_in_cascade']:21.3f} {v['in_cascade_of_alone']:7.2f}x")
        return (f"  {k:8}  {v['ms_per_image_best']:11.3f} {_macs(v['macs_per_image'], scale):>6} "
                f"{v['macs_per_s'] / 1e9:7.2f} {v['of_static']:9.2f}{tail}")
    _print_block(f"{label}, batch {row['batch']}: each stage alone (every image going on) against the static model",
                 f"  {'':8}  ms/img best  {u}MACs  GMAC/s  of static  in the cascade: ms/img  x alone",
                 (line(k, v) for k, v in row["variants"].items()), out)


def print_streaming(row, label, unit, out) -> None:
    scale, u = unit
    print(f"\n{label}, batch {row['batch']}, streaming: {row['images']} images, mean "
          f"{_macs(row['mean_macs'], scale)} {u}MACs/image, same exits as per-batch: "
          f"{'yes' if row['same_exits'] else 'NO'}", file=out)
    print("  {:20}  ms/img best    img/s  streaming speed-up: predicted  realised  ratio".format(""), file=out)
    for k, v in row["variants"].items():
        tail = ("" if "predicted_speedup" not in v else
                f"  {v['predicted_speedup']:26.2f}x {v['realised_speedup']:8.2f}x {v['ratio']:6.2f}")
        print(f"  {k:20}  {v['ms_per_image_best']:11.3f} {v['images_per_s_best']:8.1f}{tail}", file=out)


MODE_PRINTERS = {"adaptive": print_adaptive, "stages": print_stages, "streaming": print_streaming}


def _run_serve(args) -> int:
    """``--serve``: the loopback load test of the service (the library runs it; this prints it)."""
    from dvt_core.bench.hey import benchmark
    from dvt_core.bench.loadtest import format_report

    if args.model != "dvt_fashion_mnist":
        raise ArgumentError("--serve compares the shipped dvt_fashion_mnist with static_fashion_mnist_7x7: "
                        "run `dvt benchmark dvt_fashion_mnist --serve`")
    if min(args.concurrency) < 1 or args.requests < 1 or args.repeats < 1:
        raise ArgumentError("--concurrency, --requests and --repeats must be 1 or more")
    check_outputs(args, args.json)
    from dvt_core.bench.hey import hey_path

    hey_path()  # says how to install it, before any server starts
    out = sys.stdout if args.json != "-" else sys.stderr
    report = benchmark(concurrencies=args.concurrency, requests=args.requests, rounds=args.repeats,
                       threads=args.threads or 1, images_per_request=args.images_per_request,
                       log=lambda line: print(line, file=out, flush=True))
    print(f"{report['machine']}; {report['source']}; precision {report['precision']}", file=out)
    print(format_report(report), file=out)
    emit_json(report, args.json, force=getattr(args, "force", False))
    return 0


def run(args) -> int:
    if args.serve:
        return _run_serve(args)

    from dvt_core.model.zoo import get_spec
    from dvt_core.bench import benchmarking as bench

    _check_args(args)
    check_outputs(args, args.json)
    spec = get_spec(args.model, **parse_overrides(args.override))
    if args.split is not None or args.budget is not None:
        _shares(args, spec, bench_costs(spec))  # a bad --split / --budget before anything is built
    if args.weights not in (None, "default") and not os.path.exists(args.weights):
        raise ArgumentError(f"weights file or folder not found: {args.weights}")
    out = sys.stdout if args.json != "-" else sys.stderr
    cpu, amx = cpu_info()  # which CPU, and whether it has AMX: figures on AMX and without it differ in kind
    machine = {"platform": platform.platform(), "processor": cpu, "amx": amx, "cpu_count": os.cpu_count(),
               "threads": args.threads}
    if "torch" in args.backend or any(b in bench.EXPORT_FORMAT for b in args.backend):
        machine.update(bench.setup_framework("torch", args.device, args.threads))
    report = {"model": spec.name, "weights": args.weights, "machine": machine, "runs": []}
    threads = "default threads" if args.threads is None else f"{args.threads} thread{'s' * (args.threads != 1)}"
    print(f"machine: {escape_text(cpu)}, {'with' if amx else 'without'} AMX, {machine['cpu_count']} cores, {threads}, "
          f"device {machine.get('device', args.device)}", file=out)
    pairs, report["left_out"] = _offered(args.backend, args.precision)
    for note in report["left_out"]:
        print(f"note: {note}", file=out)
    with tempfile.TemporaryDirectory(prefix="dvt-benchmark-") as workdir:
        for runtime, precision in pairs:
            report["runs"].append(_run_subject(args, runtime, precision, workdir, out))
    lines = [line for r in report["runs"] for line in r["verdicts"]]
    report["verdicts"] = lines
    if lines:
        print("", file=out)
        for line in lines:
            print(line, file=out)
    emit_json(report, args.json, force=getattr(args, "force", False))
    return 0


def _offered(runtimes, precisions) -> tuple[list, list]:
    """The (runtime, precision) pairs to time, and a note for each one a runtime does not offer (left out;
    an error only when nothing is left)."""
    from dvt_core.runtime.contract import get_backend

    pairs, notes = [], []
    for runtime in runtimes:
        backend = get_backend(runtime)  # InputError for a runtime that is not installed
        offered, why = backend.precisions, backend.precisions_why
        for p in precisions:
            if p in offered:
                pairs.append((runtime, p))
            else:
                notes.append(f"the {runtime} runtime runs {', '.join(offered)}, not {p}{f' ({why})' if why else ''}: "
                             "left out")
    if not pairs:
        raise ArgumentError("; ".join(notes))
    return pairs, notes


def bench_costs(spec):
    import dvt_core

    return dvt_core.exit_macs(spec)


def _run_subject(args, runtime, precision, workdir, out) -> dict:
    """Every mode at every batch size for one runtime at one precision, and a verdict per batch size."""
    from dvt_core.bench import benchmarking as bench
    from dvt_core.runtime import policy

    subject = bench.build_subject(runtime, precision, args.model, args.weights, parse_overrides(args.override),
                                  args.threads, workdir, seed=args.seed, compile=args.compile,
                                  no_timm=args.no_timm, device=None if args.device == "cpu" else args.device,
                                  trust_native_code=args.trust_native_code)
    model = subject.model
    unit = _unit(model.exit_macs)
    thresholds, shares, what = _operating_point(args, model)
    counts = {b: bench.timed_count(b, args.images) for b in args.batch_sizes}
    images, source = bench.benchmark_images(model, max(counts.values()), args.seed)
    scale, u = unit
    print(f"\n== {subject.label}: {model.spec.name}, exit MACs "
          f"{' / '.join(_macs(c, scale) for c in model.exit_macs)} {u}, static {_macs(subject.static.exit_macs[-1], scale)} {u}"
          f"{', ' + ', '.join(subject.references) if subject.references else ''}; {source}; operating point: {what}",
          file=out)
    run = {"runtime": runtime, "precision": precision, "label": subject.label, "exit_macs": list(model.exit_macs),
           "static_macs": subject.static.exit_macs[-1], "references": list(subject.references), "images": source,
           "operating_point": what, "batches": []}
    for batch in args.batch_sizes:
        chunks = [images[i:i + batch] for i in range(0, counts[batch], batch)]
        t = thresholds
        if t is None:
            probs = bench.exit_probs(model, chunks)
            t = bench.tie_safe_thresholds(probs, policy.find_thresholds(probs, shares.astype(np.float32)))
        entry = {"batch": batch, "images": counts[batch], "thresholds": [float(v) for v in t]}
        for mode in args.modes:
            if mode == "stages":
                row = bench.time_stages(subject, chunks, args.warmup, args.repeats)
            else:
                timer = bench.time_adaptive if mode == "adaptive" else bench.time_streaming
                row = timer(subject, chunks, t, args.warmup, args.repeats)
            MODE_PRINTERS[mode](row, subject.label, unit, out)
            if mode == "adaptive":
                _print_profile(row, model, runtime, precision, out)
            row.pop("exit_index", None)
            entry[mode] = row
        run["batches"].append(entry)
    mode = next((m for m in ("adaptive", "streaming") if m in args.modes), None)
    run["verdicts"] = [bench.verdict(subject.label, b[mode]) for b in run["batches"]] if mode else []
    run["verdicts"] += _profile_verdict(model, runtime, precision, run["batches"])
    return run


def _print_profile(row, model, runtime, precision, out) -> None:
    """The time the stored cost profile predicts beside the MACs' prediction and what was realised."""
    from dvt_core.runtime.cost_model import profile_prediction

    adaptive = row["variants"]["adaptive"]
    p = profile_prediction(getattr(model, "checkpoint_meta", None), runtime, precision, row["batch"],
                           row["exit_shares"], adaptive["ms_per_image_best"])
    if p is None:
        return
    row["cost_profile"] = p
    macs = row["variants"]["static"]["predicted_speedup"]
    over = "" if "predicted_speedup" not in p else f"; over static: profile {p['predicted_speedup']:.2f}x, MACs {macs:.2f}x"
    print(f"  cost profile predicts {p['predicted_ms']:.3f} ms/img adaptive, realised {p['realised_ms']:.3f} "
          f"({p['error']:+.1%}){over}, realised {row['variants']['static']['realised_speedup']:.2f}x", file=out)


def _profile_verdict(model, runtime, precision, batches) -> list:
    """The stored cost profile's word on where early exit pays on this machine, at the operating point timed."""
    from dvt_core.errors import DVTError
    from dvt_core.runtime.cost_model import payoff_lines, stored_profile

    timed = [b["adaptive"] for b in batches if "adaptive" in b]
    try:
        profile = stored_profile(getattr(model, "checkpoint_meta", None), runtime, precision, "the weights")
    except DVTError:
        return []
    if not timed:
        return []
    return [f"cost profile: {payoff_lines(profile, timed[0]['exit_shares'])[-1]}"]
