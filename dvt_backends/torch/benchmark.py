"""The torch side of ``dvt benchmark`` (``dvt_core/cli/commands/benchmark.py`` parses the options, finds the exit
shares and writes the JSON): adaptive early exit timed against all exits, the static backbone and timm's
static model, or ONNX Runtime adaptive against torch eager adaptive, interleaved (``dvt_core.runtime.benchmarking``).
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

import dvt_core
from dvt_core.runtime import policy
from dvt_core.runtime.benchmarking import EXIT_TIE_MARGIN, figures, tie_safe_thresholds, time_interleaved, timed_count
from dvt_core.errors import InputError
from dvt_core.model.zoo import static_spec

TIMM_MODELS = {"dvt_deit_tiny": "deit_tiny_patch16_224", "dvt_deit_small": "deit_small_patch16_224",
               "dvt_deit_base": "deit_base_patch16_224"}


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


def benchmark_device(device: str, threads) -> torch.device:
    """``--threads`` applied and ``--device`` checked (InputError when torch cannot use it)."""
    if threads:
        torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise InputError(f"device {device!r} is not usable here ({str(exc).splitlines()[0]})") from None
    return dev


def _images(spec, batch: int, args):
    """The timed images at ``batch`` (seeded)."""
    n = timed_count(batch, args.images)
    g = torch.Generator().manual_seed(args.seed + batch)
    return n, torch.randn(n, spec.in_chans, spec.img_size, spec.img_size, generator=g)


def _build_dvt(make_model, seed: int):
    """The DVT ``make_model`` builds (on the CPU), its random weights seeded."""
    torch.manual_seed(seed)
    return make_model().eval()


def run_torch(args, make_model, shares, device, out) -> dict:
    """Adaptive against all exits, the static backbone and timm: the report, printed as it goes."""
    model = _build_dvt(make_model, args.seed).to(device)
    spec = model.spec
    costs = dvt_core.exit_macs(spec)
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
    m = report["machine"]
    print(f"machine: {m['processor']}, {m['cpu_count']} cores, torch {m['torch']}, {m['threads']} threads, "
          f"device {m['device']}{', ' + args.amp if args.amp else ''}{', compiled' if args.compile else ''}", file=out)
    print(f"model: {spec.name}; exit MACs {[round(c / 1e9, 3) for c in costs]} G; static {static_macs / 1e9:.3f} G; "
          f"{timm_note}", file=out)

    for batch in args.batch_sizes:
        n, images = _images(spec, batch, args)
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
        times = time_interleaved(runs, args.warmup, args.repeats)
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
            v = {**figures(ts, n), "macs_per_image": macs}
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
    return report


TORCH_ADAPTIVE, ORT_ADAPTIVE = "torch eager adaptive", "ONNX Runtime adaptive"


def run_onnx(args, make_model, shares, device, out) -> dict:
    """ONNX Runtime adaptive (per-stage graphs, the host loop) against torch eager adaptive: the report,
    printed as it goes."""
    import onnxruntime

    from dvt_core.export.writer import export_model

    model = _build_dvt(make_model, args.seed)
    spec = model.spec
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
            n, images = _images(spec, batch, args)
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

            times = time_interleaved({TORCH_ADAPTIVE: run_torch, ORT_ADAPTIVE: run_onnx}, args.warmup, args.repeats)
            exits = {k: np.concatenate([np.asarray(r.exit_index) for r in rs]) for k, rs in results.items()}
            same = bool((exits[TORCH_ADAPTIVE] == exits[ORT_ADAPTIVE]).all())
            mean_macs = float(np.concatenate([np.asarray(r.macs) for r in results[TORCH_ADAPTIVE]]).mean())
            row = {"batch": batch, "images": n, "thresholds": [float(t) for t in thresholds],
                   "exit_shares": (np.bincount(exits[TORCH_ADAPTIVE], minlength=spec.num_exits) / n).tolist(),
                   "same_exits": same, "mean_macs": mean_macs,
                   "variants": {k: figures(ts, n) for k, ts in times.items()}}
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
    return report
