"""How well a measured cost profile (``dvt profile``) predicts the realised adaptive time per image.

For each runtime and batch size, in one process and interleaved round by round (so that a change in machine
load hits both alike): the profile's measurement (``dvt_core.runtime.cost_model.measure``, its fastest round)
and true early exit of the same images at the checkpoint's stored operating point and at another one (about
40 / 40 / 20 % of the images to the exits), the fastest round each. The prediction is
``cost_model.expected_seconds`` at the exit shares the adaptive run took, with each stage's hot time
(``stage_hot_ms``) and, beside it, without (every stage priced all-through, as profiles before hot times were);
the error is prediction / realised - 1. The shipped Fashion-MNIST model on its test images.

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


def compare(model, images: np.ndarray, batch: int, rounds: int, precision: str, threads: int, others) -> list:
    """The profile's prediction against realised adaptive time at ``batch``, at the stored operating point and
    at the ``others`` (thresholds), interleaved over ``rounds``: one row per operating point."""
    from dvt_core.runtime import cost_model
    from dvt_core.runtime.contract import backend_of
    from dvt_core.runtime.operating_point import model_thresholds

    b = backend_of(model)
    count = len(images) - len(images) % batch
    xs = [b.to_tensor(model, images[i:i + batch]) for i in range(0, count, batch)]
    points = [("stored", model_thresholds(model))] + list(others)
    realised, rows, exits = {k: np.inf for k, _ in points}, [], {}
    for r in range(rounds + 1):  # the first round warms up
        rows.append(cost_model.measure(model, images[:count], [batch], 1, 0, threads=threads,
                                       precision=precision)["batches"][0])
        for name, t in points:
            start = time.perf_counter()
            results = [b.adaptive(model, x, t) for x in xs]
            if r:
                realised[name] = min(realised[name], time.perf_counter() - start)
            exits[name] = np.concatenate([np.asarray(res.exit_index) for res in results])
    best = dict(min(rows[1:], key=lambda row: row["total_ms"]))  # the fastest whole round, as dvt profile keeps
    # and each stage's fastest hot round, as dvt profile keeps (the last stage's hot time is its all-through one)
    best["stage_hot_ms"] = np.min([row["stage_hot_ms"] for row in rows[1:]], axis=0)[:-1].tolist() + \
        best["stage_ms"][-1:]
    cold = {k: v for k, v in best.items() if k != "stage_hot_ms"}  # the model before hot times: all-through only
    out = []
    for name, _ in points:
        shares = np.bincount(exits[name], minlength=model.spec.num_exits) / count
        predicted, real = cost_model.expected_seconds(best, shares) * 1e3, realised[name] / count * 1e3
        before = cost_model.expected_seconds(cold, shares) * 1e3
        out.append({"point": name, "batch": batch, "stage_ms": best["stage_ms"], "overhead_ms": best["overhead_ms"],
                    "stage_hot_ms": best["stage_hot_ms"], "stage_shape_ms": best.get("stage_shape_ms") or [],
                    "shares": shares.tolist(), "predicted_ms": predicted,
                    "realised_ms": real, "error": predicted / real - 1, "all_through_ms": before,
                    "all_through_error": before / real - 1})
    return out


def _other_point(model, images):
    """Thresholds sending about 40 / 40 / 20 % of ``images`` to the exits: an operating point the profile was
    not measured at."""
    from dvt_core.runtime import policy
    from dvt_core.bench.benchmarking import exit_probs, tie_safe_thresholds

    probs = exit_probs(model, [images[i:i + 64] for i in range(0, len(images), 64)])
    return tie_safe_thresholds(probs, policy.find_thresholds(probs, np.float32([0.4, 0.4, 0.2])))


def main(argv=None) -> int:
    from dvt_core.bench.benchmarking import benchmark_images
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
            others = [("40/40/20", _other_point(model, images))]
            for batch in args.batch_sizes:
                for c in compare(model, images, batch, args.rounds, args.precision, args.threads, others):
                    print(f"  batch {batch:3}, {c['point']:8}: stages {' / '.join(f'{s:.3f}' for s in c['stage_ms'])} "
                          f"(hot {' / '.join(f'{s:.3f}' for s in c['stage_hot_ms'][:-1])}"
                          + (f"; count change +{' / +'.join(f'{s:.3f}' for s in c['stage_shape_ms'][1:])} ms/call"
                             if c["stage_shape_ms"] else "") + ") "
                          f"+ call {c['overhead_ms']:.3f} ms/img, exits "
                          f"{' / '.join(f'{s:.0%}' for s in c['shares'])}: predicted {c['predicted_ms']:.3f} "
                          f"(all-through only {c['all_through_ms']:.3f}), realised {c['realised_ms']:.3f} ms/img "
                          f"({c['error']:+.1%}; all-through only {c['all_through_error']:+.1%})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
