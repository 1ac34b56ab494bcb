"""Exported graphs on OpenVINO and ONNX Runtime: per-stage MACs per second against the static backbone,
and the shipped Fashion-MNIST DVT against the shipped static model.

    python benchmarks/bench_openvino.py stages  [--model dvt_deit_small] [--resize gather dense] [--threads 1]
    python benchmarks/bench_openvino.py fashion [--batch-sizes 1 64] [--threads 1]
    python benchmarks/bench_openvino.py profile GRAPH.onnx [--runtime openvino|onnx] [--precision bf16]

``profile`` runs one graph at batch 1 (all shapes fixed) with per-node timing (OpenVINO ``PERF_COUNT``, ONNX
Runtime ``enable_profiling``) and prints the time per node type.

``stages`` exports ``--model`` (random weights) and its last stage alone as a one-stage cascade (the static
backbone) through the same exporter, once per ``--resize`` form, then times every stage graph at batch 1
in OpenVINO fp32 and bf16 and in ONNX Runtime fp32, and prints each stage's MACs per second as a fraction of
the static graph's in the same runtime and precision. ``fashion`` exports ``dvt_fashion_mnist`` and
``static_fashion_mnist_7x7`` with their shipped weights and times early exit at the default operating point
against the static model on the shipped test subset. All timings: one process, the variants interleaved in
every round, best of ``--rounds``; figures are ratios within this run. Needs torch (to export), onnxruntime and
openvino. ``--json FILE`` writes the figures.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dvt_core  # noqa: E402
from dvt_core.export.writer import export, export_model  # noqa: E402
from dvt_core.bench.benchmarking import time_interleaved  # noqa: E402

RUNTIMES = (("openvino", "fp32"), ("openvino", "bf16"), ("onnx", "fp32"))


def load(directory, runtime: str, precision: str, threads: int):
    model = dvt_core.build(directory, backend=runtime)
    model.set_threads(threads)
    if runtime == "openvino":
        model.set_precision(precision)
    return model


def stage_inputs(model, images) -> list:
    """Per stage: the (images, carry) it reads at batch ``len(images)``."""
    out, carry = [], None
    for i in range(model.spec.num_exits):
        out.append((images, carry))
        _, carry = model.run_stage(i, images, carry)
    return out


def per_stage_macs(spec) -> list:
    cumulative = dvt_core.exit_macs(spec)
    return [int(m - p) for m, p in zip(cumulative, [0] + list(cumulative[:-1]))]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def bench_stages(args) -> dict:
    import torch

    from dvt_core.model.zoo import get_spec, static_spec

    torch.manual_seed(0)
    spec = get_spec(args.model)
    model = dvt_core.build(spec, backend="torch").eval()
    static = dvt_core.build(static_spec(spec, spec.num_exits - 1, name=f"{spec.name}_static"), backend="torch").eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench_openvino-"))
    static_dir = export_model(static, "onnx", tmp / "static")
    dirs = {form: export_model(model, "onnx", tmp / form, resize=form) for form in args.resize}
    images = np.random.default_rng(0).standard_normal((1, spec.in_chans, spec.img_size, spec.img_size)).astype(
        np.float32)
    macs = per_stage_macs(spec)
    static_macs = per_stage_macs(static.spec)[0]
    results = {}
    for runtime, precision in RUNTIMES:
        runs = {}
        st = load(static_dir, runtime, precision, args.threads)
        runs["static"] = (lambda m=st: m.run_stage(0, images))
        for form, d in dirs.items():
            m = load(d, runtime, precision, args.threads)
            for i, (x, carry) in enumerate(stage_inputs(m, images)):
                runs[f"{form} stage {i + 1}"] = (lambda m=m, i=i, x=x, c=carry: m.run_stage(i, x, c))
        rounds = time_interleaved(runs, 2, args.rounds)
        times = {k: min(v) for k, v in rounds.items()}
        static_rate = static_macs / times["static"]
        row = {"static": {"ms": times["static"] * 1e3, "gmac_per_s": static_rate / 1e9}}
        for key, t in times.items():
            if key == "static":
                continue
            i = int(key.rsplit(" ", 1)[1]) - 1
            # the same ratio round by round (stage and static timed back to back), then its median: steadier
            # than the ratio of two best times when other jobs load the machine
            paired = float(np.median([(macs[i] / a) / (static_macs / b) for a, b in zip(rounds[key], rounds["static"])]))
            row[key] = {"ms": t * 1e3, "gmac_per_s": macs[i] / t / 1e9, "of_static": macs[i] / t / static_rate,
                        "of_static_paired_median": paired}
        results[f"{runtime} {precision}"] = row
        print(f"{runtime} {precision} (threads {args.threads}, batch 1): static {times['static'] * 1e3:.1f} ms "
              f"({static_macs / 1e9:.2f} GMAC, {static_rate / 1e9:.1f} GMAC/s)", flush=True)
        for key, r in row.items():
            if key != "static":
                print(f"  {key:18s} {r['ms']:8.1f} ms  {r['gmac_per_s']:6.1f} GMAC/s  {r['of_static']:.2f}x static's "
                      f"rate (best times), {r['of_static_paired_median']:.2f}x (median of paired rounds)")
    return {"model": spec.name, "stage_macs": macs, "static_macs": static_macs, "results": results}


def bench_fashion(args) -> dict:
    """Early exit of the shipped DVT at its default thresholds against the shipped 7x7 static model."""
    from dvt_core.data.images import preprocess

    tmp = Path(tempfile.mkdtemp(prefix="bench_openvino-"))
    dvt_dir = export("dvt_fashion_mnist", weights="default", fmt="onnx", out=tmp / "dvt", resize=args.resize[0])
    static_dir = export("static_fashion_mnist_7x7", weights="default", fmt="onnx", out=tmp / "static")
    with np.load(ROOT / "dvt_core" / "assets" / "fashion_mnist_test_subset.npz") as d:
        raw = d["images"][:args.images]
    results = {}
    for runtime, precision in RUNTIMES:
        dvt_model = load(dvt_dir, runtime, precision, args.threads)
        static_model = load(static_dir, runtime, precision, args.threads)
        x = preprocess(raw, dvt_model.spec)
        thresholds = dvt_model.manifest["thresholds"]
        for batch in args.batch_sizes:
            n = len(x) - len(x) % batch
            batches = [x[i:i + batch] for i in range(0, n, batch)]
            res = [dvt_model.adaptive(b, thresholds) for b in batches]
            mean_macs = float(np.mean(np.concatenate([r.macs for r in res])))
            static_macs = float(static_model.exit_macs[-1])
            runs = {"dvt": lambda: [dvt_model.adaptive(b, thresholds) for b in batches],
                    "static": lambda: [static_model.run_stage(0, b) for b in batches]}
            rounds = time_interleaved(runs, 1, args.rounds)
            times = {k: min(v) / n for k, v in rounds.items()}
            speedup, predicted = times["static"] / times["dvt"], static_macs / mean_macs
            paired = float(np.median([b / a for a, b in zip(rounds["dvt"], rounds["static"])]))
            key = f"{runtime} {precision} batch {batch}"
            results[key] = {"resize": dvt_model.manifest.get("resize"), "dvt_ms_per_image": times["dvt"] * 1e3, "static_ms_per_image": times["static"] * 1e3,
                            "speedup": speedup, "speedup_paired_median": paired, "predicted": predicted, "of_prediction": speedup / predicted,
                            "dvt_mean_macs": mean_macs, "static_macs": static_macs, "images": n}
            print(f"{key:26s} dvt {times['dvt'] * 1e3:.3f} ms/img, static {times['static'] * 1e3:.3f} ms/img: "
                  f"{speedup:.2f}x, paired rounds {paired:.2f}x (MACs predict {predicted:.2f}x: "
                  f"{speedup / predicted:.2f} of it)", flush=True)
    return {"images": args.images, "results": results}


def profile_graph(path: str, runtime: str, precision: str, threads: int, calls: int) -> dict:
    """Microseconds per call spent in each (node type, kernel) of graph ``path`` at batch 1, summed over nodes."""
    import collections

    totals: dict = collections.defaultdict(float)
    if runtime == "openvino":
        import openvino as ov

        core = ov.Core()
        graph = core.read_model(path)
        graph.reshape({i.get_any_name(): [1] + [d.get_length() for d in list(i.get_partial_shape())[1:]]
                       for i in graph.inputs})
        hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[precision]
        compiled = core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERF_COUNT": True,
                                                     "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        feeds = {i.get_any_name(): np.random.default_rng(0).standard_normal(list(i.get_shape())).astype(np.float32)
                 for i in compiled.inputs}
        for _ in range(5):
            request.infer(feeds)
        for _ in range(calls):
            request.infer(feeds)
            for node in request.profiling_info:
                totals[(node.node_type, node.exec_type)] += node.real_time.total_seconds() * 1e6 / calls
        return dict(totals)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="bench_openvino-")) / "ort")
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.random.default_rng(0).standard_normal([1] + list(i.shape[1:])).astype(np.float32)
             for i in session.get_inputs()}
    for _ in range(5 + calls):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            totals[(e["args"].get("op_name", "?"), "cpu")] += e["dur"] / (5 + calls)
    return dict(totals)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("stages", "fashion", "profile"))
    p.add_argument("graph", nargs="?", help="profile: the .onnx graph")
    p.add_argument("--runtime", default="openvino", choices=("openvino", "onnx"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--model", default="dvt_deit_small")
    p.add_argument("--resize", nargs="+", default=None, choices=("gather", "dense", "auto"),
                   help="resize forms to export (stages: default gather and dense; fashion: the first, default auto)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--images", type=int, default=512, help="fashion: images of the shipped subset timed")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.resize = args.resize or (["gather", "dense"] if args.what == "stages" else ["auto"])
    import openvino

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"{cpu_name()}, {args.threads} thread(s), OpenVINO {openvino.__version__}; {started}", flush=True)
    if args.what == "profile":
        table = profile_graph(args.graph, args.runtime, args.precision, args.threads, args.calls)
        total = sum(table.values())
        print(f"{args.graph} on {args.runtime} {args.precision}, batch 1: {total:.0f} us in nodes per call")
        for (kind, kernel), us in sorted(table.items(), key=lambda kv: -kv[1])[:20]:
            print(f"  {kind:24s} {kernel:28s} {us:10.1f} us  {100 * us / total:5.1f}%")
        return 0
    figures = bench_stages(args) if args.what == "stages" else bench_fashion(args)
    figures.update({"cpu": cpu_name(), "threads": args.threads, "openvino": openvino.__version__, "started": started})
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
