"""ONNX Runtime adaptive inference (per-stage graphs, host loop) against torch eager adaptive.

    python benchmarks/bench_onnx.py [--model dvt_deit_small] [--batches 1 64] [--split 0.6 0.25 0.15]

The model (random weights) is exported with ``dvt_core.export`` into a temporary folder and loaded with
``dvt_core.build(DIR, backend="onnx")``. Thresholds (dvt_core.policy.find_thresholds on the very images
timed) send the requested shares of images to exits 1, 2, 3; both runtimes get the same thresholds and
the same images, timed interleaved, best of ``--repeats``: read the ratio (the machine may be shared).
Goal: ONNX Runtime at least as fast as torch eager at batch 1 and at batch 64.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import dvt_core
from dvt_core import policy
from dvt_core.export import export_model


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dvt_deit_small")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--split", type=float, nargs="+", default=[0.6, 0.25, 0.15])
    ap.add_argument("--images", type=int, default=24, help="images timed one by one at batch 1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="threads for both runtimes (default: theirs)")
    ap.add_argument("-O", "--override", action="append", default=[], metavar="KEY=VALUE",
                    help="spec override, e.g. -O grids=[2,3,4] (quick runs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.override)}
    torch.manual_seed(0)
    model = dvt_core.build(args.model, backend="torch", **overrides).eval()
    spec = model.spec
    with tempfile.TemporaryDirectory() as tmp:
        out = export_model(model, "onnx", Path(tmp) / "export")
        from dvt_backends.onnx import load

        rt = load(out, threads=args.threads)
        print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}"
              f" ({args.threads or 'default'} threads)")
        print(f"model: {args.model}{' ' + str(overrides) if overrides else ''}; target split {args.split}")
        for batch in args.batches:
            n = max(batch, args.images if batch == 1 else batch)
            images = np.random.default_rng(batch).standard_normal(
                (n, spec.in_chans, spec.img_size, spec.img_size)).astype(np.float32)
            with torch.no_grad():
                probs = np.stack([o.softmax(-1).numpy() for o in model(torch.from_numpy(images))])
            thresholds = policy.find_thresholds(probs, np.asarray(args.split, dtype=np.float32))
            # find_thresholds puts each threshold exactly on one image's confidence; 1e-5 lower, that image
            # leaves in both runtimes whatever their last-bit differences (logits agree to about 1e-6)
            thresholds[:-1] -= 1e-5
            np_chunks = [images[i:i + batch] for i in range(0, n, batch)]
            t_chunks = [torch.from_numpy(c) for c in np_chunks]

            def run_torch():
                return [model.adaptive(c, thresholds) for c in t_chunks]

            def run_onnx():
                return [rt.adaptive(c, thresholds) for c in np_chunks]

            a, b = run_torch(), run_onnx()  # warm-up; the same exits from both
            ea = np.concatenate([r.exit_index for r in a])
            eb = np.concatenate([r.exit_index for r in b])
            t_torch = t_onnx = float("inf")
            for _ in range(args.repeats):  # interleaved so that load changes hit both alike
                t_torch = min(t_torch, best_time(run_torch, 1))
                t_onnx = min(t_onnx, best_time(run_onnx, 1))
            share = np.bincount(ea, minlength=spec.num_exits) / len(ea)
            print(f"\nbatch {batch}: {n} images, exit shares {np.round(share, 3).tolist()}, "
                  f"same exits: {bool((ea == eb).all())}")
            print(f"  per image: torch eager adaptive {t_torch / n * 1e3:.2f} ms, "
                  f"ONNX Runtime adaptive {t_onnx / n * 1e3:.2f} ms")
            print(f"  ONNX Runtime vs torch: {t_torch / t_onnx:.2f}x "
                  f"({'goal met' if t_torch >= t_onnx else 'goal NOT met'}: at least 1.00x)")


if __name__ == "__main__":
    main()
