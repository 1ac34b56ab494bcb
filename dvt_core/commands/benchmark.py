"""``dvt benchmark``: wall-clock of true early exit against every exit, the static backbone and timm.

Conventions of timm's ``benchmark.py``: random images, warm-up runs, then timed runs; ms per image and
images per second, best and median. The variants are timed interleaved (one run of each per round,
``--repeats`` rounds), so that a change in machine load hits them alike: read the ratios, measured
within one run. Thresholds come from ``--split`` (the share of the images leaving at each exit, found
on the very images timed) or ``--budget`` (average MACs per image). Torch backend.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import numpy as np

from ._shared import UserError, add_force_option, check_outputs, emit_json, parse_overrides

HELP = "time adaptive inference against all exits, the static backbone and timm (ratios measured in one run)"

TIMM_MODELS = {"dvt_deit_tiny": "deit_tiny_patch16_224", "dvt_deit_small": "deit_small_patch16_224",
               "dvt_deit_base": "deit_base_patch16_224"}


def add_arguments(parser) -> None:
    parser.add_argument("model", help="zoo model name (see `dvt flops --list`)")
    parser.add_argument("--override", "-O", action="append", metavar="KEY=VALUE", help="spec override (repeatable)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], metavar="B")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--split", type=float, nargs="+", default=None, metavar="SHARE",
                   help="share of the images leaving at each exit (default 0.6 0.25 0.15 for three exits)")
    g.add_argument("--budget", type=float, default=None, metavar="MACS",
                   help="average MACs per image; the shares follow the paper's budget rule")
    parser.add_argument("--images", type=int, default=32,
                        help="images per timed run at each batch size (at least one batch; default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best and median over them)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compilation happens there)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model first (dynamic shapes)")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast to this dtype")
    parser.add_argument("--no-timm", action="store_true", help="leave timm's model out even when importable")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="F", help="write the figures as JSON ('-' for stdout)")
    add_force_option(parser)


def _shares(args, spec, costs) -> np.ndarray:
    from .. import policy

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
    for name in ("images", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be 1 or more, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {args.warmup}")
    if any(b < 1 for b in args.batch_sizes):
        raise UserError(f"--batch-sizes must be 1 or more, got {args.batch_sizes}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be 1 or more, got {args.threads}")


def _timm_model(name: str, num_classes: int, img_size: int):
    """timm's static model of the same width, or (None, why)."""
    timm_name = TIMM_MODELS.get(name)
    if timm_name is None:
        return None, f"timm has no model matching {name}"
    try:
        import timm
    except Exception as exc:  # timm needs torchvision, which may not import beside this torch
        return None, f"timm is not importable here ({type(exc).__name__}: {exc})".splitlines()[0]
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, img_size=img_size).eval(), timm_name


def run(args) -> int:
    import contextlib

    import torch

    import dvt_core
    from .. import policy
    from ..zoo import get_spec, static_spec

    _check_args(args)
    check_outputs(args, args.json)
    spec = get_spec(args.model, **parse_overrides(args.override))
    costs = dvt_core.exit_macs(spec)
    shares = _shares(args, spec, costs)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"device {args.device!r} is not usable here ({str(exc).splitlines()[0]})") from None

    torch.manual_seed(args.seed)
    model = dvt_core.build(spec).to(device).eval()
    last = spec.num_exits - 1
    static = dvt_core.build(static_spec(spec, last)).to(device).eval()
    static_macs = dvt_core.exit_macs(static.spec)[-1]
    variants = {"all exits": (lambda x: model(x), costs[-1]), "static": (lambda x: static(x), static_macs)}
    timm_note = "left out (--no-timm)"
    if not args.no_timm:
        tm, timm_note = _timm_model(spec.name, spec.num_classes, spec.img_size)
        if tm is not None:
            tm = tm.to(device)
            variants[f"timm {timm_note}"] = (lambda x: tm(x), static_macs)  # same architecture as our static
            timm_note = f"timm {timm_note} (MACs taken as our static backbone's: same architecture)"
    if args.compile:
        model.compile()
        static.compile()
        for key, (fn, m) in list(variants.items()):
            if key.startswith("timm"):
                variants[key] = (torch.compile(tm, dynamic=True), m)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    report = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                          "amp": args.amp, "compile": args.compile},
              "model": spec.name, "exit_macs": costs, "static_macs": static_macs, "timm": timm_note,
              "target_shares": shares.tolist(), "batches": []}
    out = sys.stdout if args.json != "-" else sys.stderr
    m = report["machine"]
    print(f"machine: {m['processor']}, {m['cpu_count']} cores, torch {m['torch']}, {m['threads']} threads, "
          f"device {m['device']}{', ' + args.amp if args.amp else ''}{', compiled' if args.compile else ''}", file=out)
    print(f"model: {spec.name}; exit MACs {[round(c / 1e9, 3) for c in costs]} G; static {static_macs / 1e9:.3f} G; "
          f"{timm_note}", file=out)

    for batch in args.batch_sizes:
        n = max(batch, args.images)
        n -= n % batch  # whole batches only
        g = torch.Generator().manual_seed(args.seed + batch)
        images = torch.randn(n, spec.in_chans, spec.img_size, spec.img_size, generator=g).to(device)
        chunks = [images[i:i + batch] for i in range(0, n, batch)]
        with torch.no_grad(), autocast():
            probs = np.concatenate([np.stack([o.float().softmax(-1).cpu().numpy() for o in model(c)]) for c in chunks],
                                   axis=1)
        thresholds = policy.find_thresholds(probs, shares.astype(np.float32))

        def timed(fn):
            def go():
                with torch.no_grad(), autocast():
                    for c in chunks:
                        fn(c)
                sync()
            return go

        results = []

        def adaptive():
            with autocast():
                results[:] = [model.adaptive(c, thresholds) for c in chunks]

        runs = {"adaptive": adaptive, **{k: timed(fn) for k, (fn, _) in variants.items()}}
        for _ in range(args.warmup):
            for fn in runs.values():
                fn()
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        if not results:
            adaptive()
        exits = np.concatenate([r.exit_index for r in results])
        mean_macs = float(np.concatenate([r.macs for r in results]).mean())
        row = {"batch": batch, "images": n, "thresholds": [float(t) for t in thresholds],
               "exit_shares": (np.bincount(exits, minlength=spec.num_exits) / n).tolist(),
               "mean_macs": mean_macs, "variants": {}}
        best_ad = min(times["adaptive"])
        for k, ts in times.items():
            macs = mean_macs if k == "adaptive" else variants[k][1]
            best, med = min(ts), statistics.median(ts)
            v = {"ms_per_image_best": best / n * 1e3, "ms_per_image_median": med / n * 1e3,
                 "images_per_s_best": n / best, "macs_per_image": macs}
            if k != "adaptive":
                v["predicted_speedup"] = macs / mean_macs
                v["realised_speedup"] = best / best_ad
                v["ratio"] = v["realised_speedup"] / v["predicted_speedup"]
            row["variants"][k] = v
        report["batches"].append(row)
        print(f"\nbatch {batch}: {n} images, exit shares {np.round(row['exit_shares'], 3).tolist()}, "
              f"mean {mean_macs / 1e9:.3f} GMACs/image", file=out)
        width = max(len(k) for k in times)
        print(f"  {'':{width}}  ms/img best  median   img/s  GMACs  adaptive speed-up: predicted  realised  ratio",
              file=out)
        for k, v in row["variants"].items():
            tail = ("" if k == "adaptive" else
                    f"  {v['predicted_speedup']:25.2f}x {v['realised_speedup']:8.2f}x {v['ratio']:6.2f}")
            print(f"  {k:{width}}  {v['ms_per_image_best']:11.2f} {v['ms_per_image_median']:7.2f} "
                  f"{v['images_per_s_best']:7.1f} {v['macs_per_image'] / 1e9:6.3f}{tail}", file=out)
    emit_json(report, args.json, force=getattr(args, "force", False))
    return 0
