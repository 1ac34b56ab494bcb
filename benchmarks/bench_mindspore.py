"""MindSpore vs PyTorch throughput of the same DVT on the same batch (forward of every exit, inference).

Both backends get the same weights (torch's state copied into the MindSpore Cell) and the same images;
the script first checks that every exit agrees within 1e-4, then times ``model(images)`` (torch under
``no_grad`` in eval mode; MindSpore in eval mode, in PyNative and in graph mode via ``DVT.compiled()``,
whose one-off compilation is reported apart). Runs of the backends alternate, so a busy machine slows
them alike, and the best of ``--repeat`` runs counts. It prints images/s and the MindSpore / torch
ratio measured in this run, with the machine it ran on.

    python3 benchmarks/bench_mindspore.py [--model dvt_t2t_vit_12] [--batch 16] [--repeat 3]
                                          [--modes pynative,graph] [--threads N]

Where MindSpore's CPU time goes (MindSpore 2.10, see dvt_backends/mindspore/compat.py): LayerNorm, the erf
of the exact GELU, broadcasting element-wise ops and every transpose / strided copy run 3-15x slower
than torch's kernels; matrix products run about as fast. The backend therefore avoids transposes
(per-head projections, channel-major relation maps, resizes as 1x1 convolutions), which took it from
about 0.2 to about 0.5 of torch's throughput on a 2-core machine; the remaining gap is in those kernels.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{cpu}, {os.cpu_count()} logical CPUs, load average {load}, {platform.system()} {platform.release()}"


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dvt_t2t_vit_12")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per backend (best counts)")
    ap.add_argument("--modes", default="pynative,graph", help="MindSpore modes to time: pynative, graph")
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op threads for both frameworks (0: each framework's default); on a shared "
                         "machine 1 gives stable numbers: torch's spinning OpenMP threads suffer most from load")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(modes) - {"pynative", "graph"}
    if bad:
        ap.error(f"unknown mode(s) {sorted(bad)}")

    import mindspore as ms
    import torch

    import dvt_core  # first: registers dvt_backends in a checkout
    from dvt_backends.mindspore import RUNTIME as bm
    from dvt_backends.torch import RUNTIME as bt

    if args.threads:
        torch.set_num_threads(args.threads)
        ms.set_context(runtime_num_threads=args.threads)  # before the first MindSpore kernel runs
    spec = dvt_core.get_spec(args.model)
    torch.manual_seed(0)
    tm = bt.build_model(spec).eval()
    mm = bm.build_model(spec)
    bm.load_state(mm, bt.model_state(tm))
    mm.set_train(False)
    x = np.random.default_rng(0).standard_normal((args.batch, spec.in_chans, spec.img_size, spec.img_size))
    x = x.astype(np.float32)
    xt, xm = torch.from_numpy(x), ms.Tensor(x)

    def run_torch():
        with torch.no_grad():
            return [o.numpy() for o in tm(xt)]

    runners = {}
    if "pynative" in modes:
        runners["pynative"] = lambda: [o.asnumpy() for o in mm(xm)]
    compile_s = None
    if "graph" in modes:
        graph = mm.compiled()
        t = time.perf_counter()
        graph(xm)[0].asnumpy()
        compile_s = time.perf_counter() - t
        runners["graph"] = lambda: [o.asnumpy() for o in graph(xm)]

    # correctness first (this also warms every path up)
    ref = run_torch()
    for mode, run in runners.items():
        worst = max(float(np.abs(a - b).max()) for a, b in zip(run(), ref))
        status = "ok" if worst <= 1e-4 else "MISMATCH"
        print(f"check   MindSpore {mode:<8} vs torch: worst max|difference| over exits {worst:.2e} ({status})")
        if worst > 1e-4:
            return 1

    best = {"torch": float("inf"), **{m: float("inf") for m in runners}}
    for _ in range(args.repeat):  # alternate the backends so background load hits them alike
        best["torch"] = min(best["torch"], best_of(run_torch, 1))
        for mode, run in runners.items():
            best[mode] = min(best[mode], best_of(run, 1))

    n = args.batch
    print(f"machine {machine()}")
    print(f"        torch {torch.__version__} ({torch.get_num_threads()} threads), mindspore {ms.__version__} "
          f"({ms.get_context('runtime_num_threads')} threads, device {ms.get_context('device_target')})")
    print(f"model   {spec.name}, {spec.num_exits} exits (grids {spec.grids}), batch {n} at {spec.img_size} px, "
          f"forward of every exit, eval, best of {args.repeat}")
    print(f"torch              {n / best['torch']:8.2f} images/s  ({best['torch'] * 1e3:8.1f} ms/batch)")
    for mode in runners:
        extra = f", one-off compile {compile_s:.1f} s" if mode == "graph" else ""
        print(f"mindspore {mode:<8} {n / best[mode]:8.2f} images/s  ({best[mode] * 1e3:8.1f} ms/batch)  "
              f"ratio to torch {best['torch'] / best[mode]:.2f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
