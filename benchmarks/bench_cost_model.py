"""How well a measured cost profile (``dvt profile``) predicts the realised adaptive time per image.

For each runtime and batch size, in one process and interleaved round by round (so that a change in machine
load hits both alike): the profile's measurement (every stage inside the cascade, best of the rounds) and true
early exit of the same images at the checkpoint's stored operating point (best of the rounds). The profile's
prediction is ``sum_k reaching_k * stage_ms_k`` with the exit shares the adaptive run took; the error is
prediction / realised - 1. The shipped Fashion-MNIST model on its test images by default.

    python3 benchmarks/bench_cost_model.py [--backends torch onnx] [--batch-sizes 1 64] [--images 256]
                                           [--rounds 5] [--threads 1] [--precision fp32]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _model(backend: str, precision: str, threads: int, workdir: str):
    import dvt_core
    from dvt_core.export.writer import export_model
    from dvt_core.runtime.contract import backend_of

    if backend == "torch":
        model = dvt_core.build("dvt_fashion_mnist", weights="default", precision=precision)
        backend_of(model).set_threads(model, threads)
        return model
    src = dvt_core.build("dvt_fashion_mnist", weights="default")
    folder = export_model(src, "onnx", Path(workdir) / f"dvt-{backend}")
    return dvt_core.build(folder, backend=backend, precision=precision, threads=threads)


def compare(model, images: np.ndarray, batch: int, rounds: int, precision: str, threads: int) -> dict:
    """The profile's prediction against realised adaptive time at ``batch``, interleaved over ``rounds``."""
    from dvt_core.runtime import cost_model
    from dvt_core.runtime.contract import backend_of

    b = backend_of(model)
    count = len(images) - len(images) % batch
    xs = [b.to_tensor(model, images[i:i + batch]) for i in range(0, count, batch)]
    realised, rows, results = np.inf, [], []
    for r in range(rounds + 1):  # the first round warms up
        rows.append(cost_model.measure(model, images[:count], [batch], 1, 0, threads=threads,
                                       precision=precision)["batches"][0])
        t = time.perf_counter()
        results = [b.adaptive(model, x) for x in xs]
        if r:
            realised = min(realised, time.perf_counter() - t)
    best = {"batch": batch, "stage_ms": np.min([row["stage_ms"] for row in rows[1:]], axis=0).tolist(),
            "overhead_ms": min(row["overhead_ms"] for row in rows[1:])}
    exits = np.concatenate([np.asarray(res.exit_index) for res in results])
    shares = np.bincount(exits, minlength=model.spec.num_exits) / len(exits)
    predicted = cost_model.expected_seconds(best, shares) * 1e3
    real = realised / count * 1e3
    return {"batch": batch, "stage_ms": best["stage_ms"], "overhead_ms": best["overhead_ms"], "shares": shares.tolist(), "predicted_ms": predicted,
            "realised_ms": real, "error": predicted / real - 1}


def main(argv=None) -> int:
    from dvt_core.runtime.benchmarking import benchmark_images
    from dvt_core.runtime.cost_model import machine_record

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["torch", "onnx"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dvt-bench-cost-") as workdir:
        for backend in args.backends:
            model = _model(backend, args.precision, args.threads, workdir)
            images, what = benchmark_images(model, args.images, 0)
            m = machine_record(backend, args.precision, args.threads)
            print(f"{backend} {args.precision}, {args.threads} thread(s); {m['cpu']} ({'AMX' if m['amx'] else 'no AMX'}), "
                  f"{m['cores']} cores; {what}")
            for batch in args.batch_sizes:
                c = compare(model, images, batch, args.rounds, args.precision, args.threads)
                print(f"  batch {batch:3}: stages {' / '.join(f'{s:.3f}' for s in c['stage_ms'])} + call "
                      f"{c['overhead_ms']:.3f} ms/img, exits "
                      f"{' / '.join(f'{s:.0%}' for s in c['shares'])}: predicted {c['predicted_ms']:.3f}, realised "
                      f"{c['realised_ms']:.3f} ms/img ({c['error']:+.1%})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
