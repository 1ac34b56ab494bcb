"""Serving throughput and latency: the adaptive service against every stage and the static model.

    python benchmarks/bench_serve.py [--concurrency 1 16] [--requests 400] [--rounds 2] [--threads 1]
                                     [--images-per-request 64]

Starts three real `dvt serve` processes on 127.0.0.1 (the shipped ``dvt_fashion_mnist`` at its default
thresholds; the same with ``--thresholds 1e8,1e8``, every image running every stage; the shipped
``static_fashion_mnist_7x7``), drives each with the ``hey`` load generator (N keep-alive workers): PNG
files of Fashion-MNIST test images to ``/v1/predict``, and ``/v2`` requests of many images as one binary
tensor, interleaved, best of ``--rounds``; prints images/s, p50 / p99 latency and the server's CPU per
image, the MAC-predicted gain (static MACs / adaptive MACs), the gains measured and the in-process
references. The same as ``dvt benchmark dvt_fashion_mnist --serve``.
"""
from __future__ import annotations

import argparse
import json

from dvt_core.bench.hey import benchmark
from dvt_core.bench.loadtest import format_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests", type=int, default=400, help="requests per load run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--images", type=int, default=1000, help="distinct test images posted (round robin)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="each server's CPU threads (OMP_NUM_THREADS)")
    ap.add_argument("--images-per-request", type=int, default=64, help="images per /v2 request")
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args()
    report = benchmark(args.images, args.concurrency, args.requests, args.rounds, args.max_batch, args.max_wait_ms,
                       args.threads, args.images_per_request, log=print)
    print(report["machine"], "|", report["source"], "|", "precision", report["precision"])
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
