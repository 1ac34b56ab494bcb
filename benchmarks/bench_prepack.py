"""Each torch stage's MACs per second against the static model's, with oneDNN's prepacked linear weights
(``dvt_backends.torch.layers.Linear``) and with plain ``addmm``, timed interleaved in one process.

    python benchmarks/bench_prepack.py [--model dvt_deit_small] [--batches 1 64] [--precisions fp32 bf16]

Random weights; each stage runs with the carry the previous stage produced (as in the cascade); the static
model is ``dvt_core.static_spec(spec, last stage)``. Prints ms per call and GMAC/s per stage, and each stage's
rate as a share of the static model's (the goal is at least 0.85), for prepacked and plain weights. ``--clock cpu``
times this thread's CPU time instead of wall time (one thread), for a machine other work keeps loaded.
"""
from __future__ import annotations

import argparse
import time

import torch

import dvt_core
from dvt_backends.torch import layers


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def best_ms(fn, repeats: int, clock=time.perf_counter) -> float:
    fn()
    t_best = float("inf")
    for _ in range(repeats):
        t = clock()
        fn()
        t_best = min(t_best, clock() - t)
    return t_best * 1e3


def stage_calls(model, images):
    """One call per stage, each fed the carry its predecessor produced (computed once, outside the timing)."""
    calls, carry = [], None
    with torch.no_grad():
        for i in range(model.spec.num_exits):
            calls.append((lambda i=i, c=carry: model.run_stage(i, images, c)))
            _, carry = model.run_stage(i, images, carry)
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dvt_deit_small")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="cpu: this thread's CPU time (with --threads 1), steadier than wall time on a machine "
                         "that other work keeps busy, which takes the core away between time slices")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = dvt_core.get_spec(args.model)
    model = dvt_core.build(spec)
    static = dvt_core.build(dvt_core.static_spec(spec, spec.num_exits - 1))
    step_macs = [b - a for a, b in zip([0] + model.exit_macs[:-1], model.exit_macs)]
    for precision in args.precisions:
        model.set_precision(precision), static.set_precision(precision)
        for b in args.batches:
            x = torch.randn(b, spec.in_chans, spec.img_size, spec.img_size).to(model.dtype)
            calls = stage_calls(model, x) + stage_calls(static, x)
            macs = [m * b for m in step_macs] + [static.exit_macs[-1] * b]
            times = {True: [float("inf")] * len(calls), False: [float("inf")] * len(calls)}
            for _ in range(args.repeats):  # interleaved: prepacked, plain, prepacked, ...
                for packed in (True, False):
                    layers.PREPACK["enabled"] = packed
                    with torch.no_grad():
                        for k, fn in enumerate(calls):
                            times[packed][k] = min(times[packed][k], best_ms(fn, 1, CLOCKS[args.clock]))
            layers.PREPACK["enabled"] = True
            for packed in (True, False):
                rates = [m / t / 1e6 for m, t in zip(macs, times[packed])]
                cells = "  ".join(f"{t:7.2f} ms {r:5.0f} GMAC/s ({r / rates[-1]:.2f})"
                                  for t, r in zip(times[packed], rates))
                print(f"{precision} batch {b:3d} {'prepacked' if packed else 'addmm    '}: stages, static: {cells}")


if __name__ == "__main__":
    main()
