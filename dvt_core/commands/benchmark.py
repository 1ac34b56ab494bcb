"""``dvt benchmark``: wall-clock of true early exit against every exit, the static backbone and timm
(``--backend torch``), or of ONNX Runtime adaptive against torch eager adaptive (``--backend onnx``).

Conventions of timm's ``benchmark.py``: random images, warm-up runs, then timed runs; ms per image and
images per second, best and median. The variants are timed interleaved (one run of each per round,
``--repeats`` rounds), so that a change in machine load hits them alike: read the ratios, measured
within one run. Thresholds come from ``--split`` (the share of the images leaving at each exit, found
on the very images timed) or ``--budget`` (average MACs per image).

``--backend onnx`` exports the torch model (random weights, or ``--weights``) per stage into a temporary
folder with :func:`dvt_core.export.export_model`, loads it with ``dvt_core.build(DIR, backend="onnx")``
and times both runtimes' ``adaptive`` with the same thresholds on the same images.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import numpy as np

from ._shared import UserError, add_force_option, check_device, check_outputs, emit_json, parse_overrides

HELP = ("time adaptive inference against all exits, the static backbone and timm, or ONNX Runtime against "
        "torch eager (ratios measured in one run)")

BACKENDS = ("torch", "onnx")
# find_thresholds puts each threshold exactly on one image's confidence. The runtimes' logits differ in
# the last bits (about 1e-6), so that image could leave in one and go on in the other; a threshold up to
# this much lower makes it leave in both, and both runtimes then take the same exits (checked, reported).
EXIT_TIE_MARGIN = 1e-5

TIMM_MODELS = {"dvt_deit_tiny": "deit_tiny_patch16_224", "dvt_deit_small": "deit_small_patch16_224",
               "dvt_deit_base": "deit_base_patch16_224"}


def add_arguments(parser) -> None:
    parser.add_argument("model", help="zoo model name (see `dvt flops --list`)")
    parser.add_argument("--override", "-O", action="append", metavar="KEY=VALUE", help="spec override (repeatable)")
    parser.add_argument("--backend", default="torch", metavar="{torch,onnx}",
                        help="torch: adaptive against all exits, static and timm; onnx: ONNX Runtime adaptive "
                             "(per-stage export) against torch eager adaptive")
    parser.add_argument("--weights", default=None, metavar="F|default",
                        help="checkpoint for the DVT (default: random weights; timing does not depend on them)")
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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads, and ONNX Runtime intra-op threads with --backend onnx")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps); onnx: cpu or cuda")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every model first (dynamic shapes); torch backend")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast to this dtype; torch backend")
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


def tie_safe_thresholds(probs: np.ndarray, thresholds: np.ndarray, margin: float = EXIT_TIE_MARGIN) -> np.ndarray:
    """``thresholds`` (max-softmax, from ``policy.find_thresholds`` on ``probs``) each lowered off the confidence
    it sits on: by ``margin``, or by half the gap to the next lower confidence among the images still there
    when that is less, so that every image takes the same exit as before and a last-bit difference between
    two runtimes cannot move the image on the threshold."""
    conf = np.asarray(probs, np.float32).max(-1)  # (exits, images), compared in float32 as the runtimes do
    out = np.asarray(thresholds, np.float32).copy()
    left = np.ones(conf.shape[1], bool)
    for k in range(conf.shape[0] - 1):
        c = conf[k][left]
        t = float(out[k])
        taken = c >= t
        if taken.any() and not taken.all():
            t -= min(margin, (t - float(c[~taken].max())) / 2)
        elif taken.any():
            t -= margin
        out[k] = t
        left[left] = c < out[k]
    return out


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


def _time_interleaved(runs: dict, warmup: int, repeats: int) -> dict:
    """Seconds per call of every ``runs`` entry: ``warmup`` untimed rounds, then ``repeats`` timed rounds, each
    round calling every entry once, so that a change in machine load hits them alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def _figures(seconds: list, n: int) -> dict:
    best, med = min(seconds), statistics.median(seconds)
    return {"ms_per_image_best": best / n * 1e3, "ms_per_image_median": med / n * 1e3,
            "images_per_s_best": n / best, "images_per_s_median": n / med}


def _images(torch, spec, batch: int, args):
    """The timed images at ``batch``: at least ``--images`` and one batch, whole batches only."""
    n = max(batch, args.images)
    n -= n % batch
    g = torch.Generator().manual_seed(args.seed + batch)
    return n, torch.randn(n, spec.in_chans, spec.img_size, spec.img_size, generator=g)


def _build_dvt(args):
    """The torch DVT on the CPU: random weights (seeded), or ``--weights``."""
    import argparse

    import torch

    from ._shared import build_from_args

    torch.manual_seed(args.seed)
    return build_from_args(argparse.Namespace(**{**vars(args), "backend": "torch", "device": "cpu"})).eval()


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
    if args.backend == "onnx":
        check_device("onnx", device.type)  # onnxruntime importable, with a provider for the device
        return _run_onnx(args, shares, device)

    model = _build_dvt(args).to(device)
    spec = model.spec
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

    report = {"backend": "torch",
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                          "amp": args.amp, "compile": args.compile},
              "model": spec.name, "weights": args.weights, "exit_macs": costs, "static_macs": static_macs,
              "timm": timm_note, "target_shares": shares.tolist(), "batches": []}
    out = sys.stdout if args.json != "-" else sys.stderr
    m = report["machine"]
    print(f"machine: {m['processor']}, {m['cpu_count']} cores, torch {m['torch']}, {m['threads']} threads, "
          f"device {m['device']}{', ' + args.amp if args.amp else ''}{', compiled' if args.compile else ''}", file=out)
    print(f"model: {spec.name}; exit MACs {[round(c / 1e9, 3) for c in costs]} G; static {static_macs / 1e9:.3f} G; "
          f"{timm_note}", file=out)

    for batch in args.batch_sizes:
        n, images = _images(torch, spec, batch, args)
        images = images.to(device)
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
        times = _time_interleaved(runs, args.warmup, args.repeats)
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
            v = {**_figures(ts, n), "macs_per_image": macs}
            if k != "adaptive":
                v["predicted_speedup"] = macs / mean_macs
                v["realised_speedup"] = min(ts) / best_ad
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


TORCH_ADAPTIVE, ORT_ADAPTIVE = "torch eager adaptive", "ONNX Runtime adaptive"


def _run_onnx(args, shares, device) -> int:
    """ONNX Runtime adaptive (per-stage graphs, the host loop) against torch eager adaptive."""
    import tempfile
    from pathlib import Path

    import onnxruntime
    import torch

    import dvt_core
    from .. import policy
    from ..export import export_model

    model = _build_dvt(args)
    spec = model.spec
    out = sys.stdout if args.json != "-" else sys.stderr
    with tempfile.TemporaryDirectory(prefix="dvt-benchmark-") as tmp:
        folder = export_model(model, "onnx", Path(tmp) / "onnx")
        rt = dvt_core.build(folder, backend="onnx")
        if args.threads:
            rt.set_threads(args.threads)  # the runtime's session options: intra-op threads
        if device.type != "cpu":
            rt.to_device(device.type)
        model = model.to(device)
        opset = rt.manifest.get("versions", {}).get("opset")
        report = {"backend": "onnx",
                  "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                              "cpu_count": os.cpu_count(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
                              "onnxruntime_threads": args.threads, "device": str(device)},
                  "model": spec.name, "weights": args.weights, "exit_macs": dvt_core.exit_macs(spec), "opset": opset,
                  "target_shares": shares.tolist(), "exit_tie_margin": EXIT_TIE_MARGIN, "batches": []}
        m = report["machine"]
        print(f"machine: {m['processor']}, {m['cpu_count']} cores, torch {m['torch']} ({m['threads']} threads), "
              f"onnxruntime {m['onnxruntime']} ({args.threads or 'its default'} intra-op threads), "
              f"device {m['device']}", file=out)
        print(f"model: {spec.name} ({args.weights or 'random weights'}); exit MACs "
              f"{[round(c / 1e9, 3) for c in report['exit_macs']]} G; one ONNX graph per stage (opset {opset}); "
              f"target exit shares {shares.round(3).tolist()}", file=out)
        for batch in args.batch_sizes:
            n, images = _images(torch, spec, batch, args)
            np_chunks = [images[i:i + batch].numpy() for i in range(0, n, batch)]
            t_chunks = [torch.from_numpy(c).to(device) for c in np_chunks]
            with torch.no_grad():
                probs = np.concatenate([np.stack([o.softmax(-1).cpu().numpy() for o in model(c)]) for c in t_chunks],
                                       axis=1)
            thresholds = tie_safe_thresholds(probs, policy.find_thresholds(probs, shares.astype(np.float32)))
            results = {TORCH_ADAPTIVE: [], ORT_ADAPTIVE: []}

            def run_torch():
                results[TORCH_ADAPTIVE] = [model.adaptive(c, thresholds) for c in t_chunks]

            def run_onnx():
                results[ORT_ADAPTIVE] = [rt.adaptive(c, thresholds) for c in np_chunks]

            times = _time_interleaved({TORCH_ADAPTIVE: run_torch, ORT_ADAPTIVE: run_onnx}, args.warmup, args.repeats)
            exits = {k: np.concatenate([np.asarray(r.exit_index) for r in rs]) for k, rs in results.items()}
            same = bool((exits[TORCH_ADAPTIVE] == exits[ORT_ADAPTIVE]).all())
            mean_macs = float(np.concatenate([np.asarray(r.macs) for r in results[TORCH_ADAPTIVE]]).mean())
            row = {"batch": batch, "images": n, "thresholds": [float(t) for t in thresholds],
                   "exit_shares": (np.bincount(exits[TORCH_ADAPTIVE], minlength=spec.num_exits) / n).tolist(),
                   "same_exits": same, "mean_macs": mean_macs,
                   "variants": {k: _figures(ts, n) for k, ts in times.items()}}
            row["onnx_speedup_best"] = min(times[TORCH_ADAPTIVE]) / min(times[ORT_ADAPTIVE])
            row["onnx_speedup_median"] = (statistics.median(times[TORCH_ADAPTIVE])
                                          / statistics.median(times[ORT_ADAPTIVE]))
            report["batches"].append(row)
            print(f"\nbatch {batch}: {n} images, exit shares {np.round(row['exit_shares'], 3).tolist()}, "
                  f"mean {mean_macs / 1e9:.3f} GMACs/image, same exits in both runtimes: {'yes' if same else 'NO'}",
                  file=out)
            width = max(len(k) for k in times)
            print(f"  {'':{width}}  ms/img best  median   img/s", file=out)
            for k, v in row["variants"].items():
                print(f"  {k:{width}}  {v['ms_per_image_best']:11.2f} {v['ms_per_image_median']:7.2f} "
                      f"{v['images_per_s_best']:7.1f}", file=out)
            print(f"  ONNX Runtime speed-up over torch eager: {row['onnx_speedup_best']:.2f}x best, "
                  f"{row['onnx_speedup_median']:.2f}x median", file=out)
    emit_json(report, args.json, force=getattr(args, "force", False))
    return 0
