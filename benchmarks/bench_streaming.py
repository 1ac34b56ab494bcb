"""Streaming early exit against per-batch early exit and the static model, on the Fashion-MNIST test set.

    python benchmarks/bench_streaming.py [--batch-sizes 64 500] [--repeats 3] [--limit N]

The shipped ``dvt_fashion_mnist`` at its default thresholds (from its metadata) and the shipped
``static_fashion_mnist_7x7`` (the static model of the last exit's grid); images/s over the test set,
decoded images in memory, interleaved, best of ``--repeats``. Streaming gives the same exits and
predictions as per-batch early exit (checked here too); it runs the later stages on full batches.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

import dvt_core
from dvt_core.data import sources as data
from dvt_core.runtime import evaluation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 500])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="first N test images only")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels = data.load_fashion_mnist("test")
    images, labels = images[:args.limit], labels[:args.limit]
    model = dvt_core.build("dvt_fashion_mnist", weights="default")
    static = dvt_core.build("static_fashion_mnist_7x7", weights="default")
    thresholds = model.checkpoint_meta["thresholds"]
    n = len(labels)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {n} Fashion-MNIST test images; thresholds {thresholds}")
    for bs in args.batch_sizes:
        runs = {
            "streaming": lambda: evaluation.adaptive(model, images, thresholds, batch_size=bs),
            "per-batch": lambda: evaluation.adaptive(model, images, thresholds, batch_size=bs, streaming=False),
            "static 7x7": lambda: evaluation.exit_probs(static, images, batch_size=bs),
        }
        out = {k: fn() for k, fn in runs.items()}  # warm-up
        same = (np.array_equal(out["streaming"].exit_index, out["per-batch"].exit_index)
                and np.array_equal(out["streaming"].prediction, out["per-batch"].prediction))
        best = {k: float("inf") for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                t = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t)
        res = out["streaming"]
        acc = float((res.prediction == labels).mean() * 100)
        print(f"\nbatch {bs}: exits {res.exit_counts.tolist()}, accuracy {acc:.2f} %, mean "
              f"{res.mean_macs / 1e6:.2f} MMACs; streaming == per-batch: {same}")
        for k, t in best.items():
            print(f"  {k:<11} {n / t:8.0f} images/s   ({t / best['streaming']:.2f}x "
                  f"the streaming time)")


if __name__ == "__main__":
    main()
