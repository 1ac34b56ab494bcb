"""What a product costs when its weight comes from memory instead of the core's cache: the batch-1 limit of a
cascade's small stages on this machine.

At batch 1 a stage of DeiT-S reads each weight once for few token rows (50 in the 7x7 stage, 197 in the static
model), and its 12 blocks' weights (42 MB in bf16) are far larger than a core's L2 cache, so every product finds
its weight cold. This times oneDNN's prepacked linear (the path the torch stages take in CPU inference) on one
weight called again and again (hot) and on ``--weights`` different weights in turn (cold, as inside a stage), per
row count, and the single-thread read bandwidth of a large array.

    python benchmarks/bench_cold_weights.py [--rows 50 101 197] [--shape 384 1536] [--precision bf16] [--weights 48]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def read_bandwidth(megabytes: int = 256, rounds: int = 5) -> float:
    """GB/s of one thread summing a ``megabytes`` array (far larger than any cache): the best of ``rounds``."""
    a = np.ones(megabytes * 2**20 // 8)
    best = min(_timed(a.sum) for _ in range(rounds))
    return a.nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def product_seconds(rows: int, k: int, n: int, dtype: torch.dtype, weights: int, rounds: int) -> tuple[float, float]:
    """(cold, hot) seconds of one ``rows x k -> n`` prepacked product: cycling through ``weights`` weights, and on
    one weight repeated; each the best of ``rounds`` passes."""
    x = torch.randn(rows, k, dtype=dtype)
    bias = torch.zeros(n, dtype=dtype)
    packed = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k, dtype=dtype), None) for _ in range(weights)]

    def run(ws):
        for w in ws:
            torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")

    run(packed)
    cold = min(_timed(lambda: run(packed)) for _ in range(rounds)) / weights
    hot = min(_timed(lambda: run(packed[:1] * weights)) for _ in range(rounds)) / weights
    return cold, hot


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[50, 101, 197])
    ap.add_argument("--shape", type=int, nargs=2, default=[384, 1536], metavar=("IN", "OUT"))
    ap.add_argument("--precision", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--weights", type=int, default=48, help="distinct weights cycled through for the cold case")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    k, n = args.shape
    dtype = DTYPES[args.precision]
    weight_mb = k * n * torch.finfo(dtype).bits / 8 / 2**20
    print(f"{args.precision}, {args.threads} thread(s); one weight {k} x {n} = {weight_mb:.2f} MB, "
          f"{args.weights} of them cycled for the cold case; read bandwidth {read_bandwidth():.1f} GB/s")
    print(f"{'rows':>6}  {'cold us':>8}  {'GMAC/s':>7}  {'hot us':>8}  {'GMAC/s':>7}  cold / hot")
    with torch.no_grad():
        for rows in args.rows:
            cold, hot = product_seconds(rows, k, n, dtype, args.weights, args.rounds)
            macs = rows * k * n
            print(f"{rows:>6}  {cold * 1e6:8.0f}  {macs / cold / 1e9:7.0f}  {hot * 1e6:8.0f}  {macs / hot / 1e9:7.0f}"
                  f"  {cold / hot:9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
