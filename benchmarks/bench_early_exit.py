"""Realised speed-up of true early exit against what the MACs predict.

    python benchmarks/bench_early_exit.py [--model dvt_t2t_vit_12] [--batches 1 64] [--split 0.6 0.25 0.15]

For each batch size, thresholds are chosen (dvt_core.policy.find_thresholds on the very images timed)
so that the requested shares of images leave at exits 1, 2, 3. Three things are timed on the same
images, interleaved, best of ``--repeats`` (the machine may be shared and noisy: read the ratios):

* ``adaptive``: ``model.adaptive(images, thresholds)``, true early exit;
* ``all exits``: ``model(images)``, every image through every stage (what the official code runs);
* ``static``: the static backbone at the last exit's grid (e.g. T2T-ViT-12 at 14x14 tokens).

Predicted speed-ups are MAC ratios from dvt_core.macs; realised ones are time ratios. Goal: realised
at least 0.9 of predicted against the static backbone.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

import dvt_core
from dvt_core import policy
from dvt_core.zoo import static_spec


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dvt_t2t_vit_12")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--split", type=float, nargs="+", default=[0.6, 0.25, 0.15])
    ap.add_argument("--images", type=int, default=40, help="images timed one by one at batch 1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = dvt_core.get_spec(args.model)
    torch.manual_seed(0)
    model = dvt_core.build(spec).eval()
    static = dvt_core.build(static_spec(spec, spec.num_exits - 1)).eval()
    macs = dvt_core.exit_macs(spec)
    static_macs = dvt_core.exit_macs(static.spec)[-1]
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: {args.model}; exit MACs {[round(m / 1e9, 3) for m in macs]} G; static "
          f"{static_macs / 1e9:.3f} G; target split {args.split}")

    for batch in args.batches:
        n = max(batch, args.images if batch == 1 else batch)
        g = torch.Generator().manual_seed(batch)
        images = torch.randn(n, spec.in_chans, spec.img_size, spec.img_size, generator=g)
        with torch.no_grad():
            probs = np.stack([o.softmax(-1).numpy() for o in model(images)])
        thresholds = policy.find_thresholds(probs, np.asarray(args.split, dtype=np.float32))
        chunks = [images[i:i + batch] for i in range(0, n, batch)]

        def run_adaptive():
            return [model.adaptive(c, thresholds) for c in chunks]

        def run_all():
            with torch.no_grad():
                for c in chunks:
                    model(c)

        def run_static():
            with torch.no_grad():
                for c in chunks:
                    static(c)

        results = run_adaptive()  # warm-up, and the realised split
        run_all(), run_static()
        exits = np.concatenate([r.exit_index for r in results])
        mean_macs = float(np.concatenate([r.macs for r in results]).mean())
        t_ad = t_all = t_st = float("inf")
        for _ in range(args.repeats):  # interleaved so that load changes hit all three alike
            t_ad = min(t_ad, best_time(run_adaptive, 1))
            t_all = min(t_all, best_time(run_all, 1))
            t_st = min(t_st, best_time(run_static, 1))
        share = np.bincount(exits, minlength=spec.num_exits) / len(exits)
        pred_static = static_macs / mean_macs
        pred_all = macs[-1] / mean_macs
        real_static = t_st / t_ad
        real_all = t_all / t_ad
        print(f"\nbatch {batch}: {n} images, exit shares {np.round(share, 3).tolist()}, "
              f"mean {mean_macs / 1e9:.3f} GMACs/image")
        print(f"  per image: adaptive {t_ad / n * 1e3:.1f} ms, all exits {t_all / n * 1e3:.1f} ms, "
              f"static {t_st / n * 1e3:.1f} ms")
        print(f"  vs static backbone: predicted {pred_static:.2f}x, realised {real_static:.2f}x, "
              f"ratio {real_static / pred_static:.2f}")
        print(f"  vs all exits:       predicted {pred_all:.2f}x, realised {real_all:.2f}x, "
              f"ratio {real_all / pred_all:.2f}")


if __name__ == "__main__":
    main()
