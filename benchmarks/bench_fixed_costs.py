"""Where the exported runtimes' batch-1 time goes beyond the graphs: the shipped Fashion-MNIST DVT against its
static 7x7 model, one image at a time, per runtime and precision.

    python benchmarks/bench_fixed_costs.py [--dvt DIR --static DIR] [--images 64] [--rounds 9] [--threads 1]
                                           [--runtimes onnx:fp32 openvino:fp32 openvino:bf16] [--json FILE]

``--dvt`` / ``--static``: the folders ``dvt export dvt_fashion_mnist --weights default --format onnx --out DIR``
and ``dvt export static_fashion_mnist_7x7 --weights default --format onnx --out DIR`` wrote (without them both
are exported into a temporary folder, which needs torch). Per runtime, every variant below runs over the same
``--images`` Fashion-MNIST test images, one at a time, the variants interleaved in every round, every call
timed; the figures are ms per image: "best" sums each call's fastest of ``--rounds`` rounds (steady on a
machine that other jobs load: a call interrupted in one round counts as it ran in another), "median" each
call's median round:

* ``stage k bare``: the stage's graph alone, called again and again on prepared inputs (ONNX Runtime
  ``session.run`` on numpy feeds, OpenVINO ``request.infer()`` on input tensors set once, batch 1 compiled
  with every shape fixed); ``stage k bare, chained``: the same calls, the three stages one after another per
  image (what the caches see in the cascade), without the runtime's wrapper.
* ``stage k run_stage``: the runtime's ``run_stage`` on the same prepared inputs, called again and again;
  ``stage k in the cascade``: the time of each ``run_stage`` call inside full cascades (every image through
  every stage, the carry of the stage before).
* ``host loop``: the runtime's ``adaptive`` with the stages replaced by their recorded outputs: the early-exit
  loop's own cost per image (input check, exit step, confidence, select, result), at the default thresholds.
* ``adaptive``: ``adaptive`` as ``dvt benchmark`` times it; ``static bare`` and ``static run_stage``: the static
  model's graph alone and through the runtime (``run_stage`` and the logits to numpy, as ``dvt benchmark``).

The last lines split the adaptive time per image into the stages' in-cascade times weighted by the share of
images reaching them, the host loop, and what remains.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dvt_core  # noqa: E402
from dvt_core.runtime.contract import backend_of  # noqa: E402


def exported(args) -> tuple[Path, Path]:
    if args.dvt and args.static:
        return Path(args.dvt), Path(args.static)
    from dvt_core.export.writer import export

    tmp = Path(tempfile.mkdtemp(prefix="bench_fixed_costs-"))
    return (export("dvt_fashion_mnist", weights="default", fmt="onnx", out=tmp / "dvt"),
            export("static_fashion_mnist_7x7", weights="default", fmt="onnx", out=tmp / "static"))


def test_images(spec, count: int) -> np.ndarray:
    from dvt_core.data.images import preprocess

    with np.load(ROOT / "dvt_core" / "assets" / "fashion_mnist_test_subset.npz") as d:
        return preprocess(d["images"][:count], spec)


def bare_onnx(directory: Path, manifest: dict, threads: int) -> list:
    """Per stage: a call of its graph in a session of its own, as the runtime makes it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    calls = []
    for st in manifest["stages"]:
        session = ort.InferenceSession(str(directory / st["file"]), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
        calls.append(lambda feeds, s=session: (lambda: s.run(None, feeds)))
    return calls


def bare_openvino(directory: Path, manifest: dict, threads: int, precision: str) -> list:
    """Per stage: ``infer()`` of a batch-1 fixed-shape compilation whose input tensors are set once."""
    import openvino as ov

    from dvt_backends.openvino.runtime import PRECISIONS

    core = ov.Core()
    cfg = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY",
           "INFERENCE_NUM_THREADS": threads}
    calls = []
    for st in manifest["stages"]:
        graph = core.read_model(str(directory / st["file"]))
        graph.reshape({i.get_any_name(): [1] + [d.get_length() for d in list(i.get_partial_shape())[1:]]
                       for i in graph.inputs})
        request = core.compile_model(graph, "CPU", cfg).create_infer_request()

        def prepared(feeds, r=request, names=tuple(st["inputs"])):
            for k, name in enumerate(names):
                r.set_input_tensor(k, ov.Tensor(np.ascontiguousarray(feeds[name])))
            return r.infer
        calls.append(prepared)
    return calls


def feeds_of(manifest: dict, index: int, images, carry) -> dict:
    feeds = {"images": np.asarray(images)}
    for name in manifest["stages"][index]["inputs"][1:]:
        feeds[name] = np.ascontiguousarray(np.asarray(carry[name[len("prev_"):]]))
    return feeds


def replaying(runtime, recorded: list):
    """``runtime`` whose ``run_stage`` returns the recorded outputs of the image ``replay.image`` (a copy of
    the carry's arrays is not needed: the loop only reads them)."""
    class Replay(type(runtime)):
        image = 0

        def run_stage(self, model, index, images, carry=None):
            return recorded[self.image][index]
    return Replay()


def variants(model, static, runtime: str, precision: str, threads: int, images: np.ndarray) -> tuple:
    b, sb = backend_of(model), backend_of(static)
    man, n_exits = model.manifest, model.spec.num_exits
    thresholds = man["thresholds"]
    xs = [b.to_tensor(model, images[j:j + 1]) for j in range(len(images))]
    recorded = []  # per image: per stage (logits, carry) copies, the stage inputs of image 0 kept
    for x in xs:
        carry, outs = None, []
        for i in range(n_exits):
            logits, carry = b.run_stage(model, i, x, carry)
            outs.append((np.array(logits), None if carry is None else type(carry)(
                {k: np.array(v) for k, v in carry.items()}, carry.axes)))
        recorded.append(outs)
    inputs0 = [(xs[0], None)] + [(xs[0], recorded[0][i][1]) for i in range(n_exits - 1)]
    if runtime == "onnx":
        bare = bare_onnx(model.directory, man, threads)
        bare_static = bare_onnx(static.directory, static.manifest, threads)
    else:
        bare = bare_openvino(model.directory, man, threads, precision)
        bare_static = bare_openvino(static.directory, static.manifest, threads, precision)
    bare_calls = [bare[i](feeds_of(man, i, *inputs0[i])) for i in range(n_exits)]
    static_bare = bare_static[0](feeds_of(static.manifest, 0, xs[0], None))
    count = len(xs)
    runs = {}
    for i in range(n_exits):
        runs[f"stage {i + 1} bare"] = (lambda tick, c=bare_calls[i]: [tick(c) for _ in range(count)])
        runs[f"stage {i + 1} run_stage"] = (lambda tick, i=i, x=inputs0[i][0], c=inputs0[i][1]:
                                            [tick(b.run_stage, model, i, x, c) for _ in range(count)])

    def chained(tick):
        for _ in range(count):
            for i, call in enumerate(bare_calls):
                tick(call, key=f"stage {i + 1} bare, chained")

    def cascade(tick):
        for x in xs:
            carry = None
            for i in range(n_exits):
                logits, carry = tick(b.run_stage, model, i, x, carry, key=f"stage {i + 1} in the cascade")

    replay = replaying(b, recorded)

    def host_loop(tick):
        for j in range(count):
            replay.image = j
            tick(replay.adaptive, model, images[j:j + 1], thresholds)

    runs.update({"chained": chained, "cascade": cascade, "host loop": host_loop,
                 "adaptive": lambda tick: [tick(b.adaptive, model, x, thresholds) for x in xs],
                 "static bare": lambda tick: [tick(static_bare) for _ in range(count)],
                 "static run_stage": lambda tick: [tick(lambda x: sb.to_numpy(sb.run_stage(static, 0, x)[0]), x)
                                                   for x in xs]})
    exits = np.concatenate([b.adaptive(model, x, thresholds).exit_index for x in xs])
    return runs, exits


def measure(runs: dict, rounds: int) -> dict:
    """ms per image of every run (and of every part a run times under its own key): every call is timed, the
    runs interleaved round by round; "best" sums each call's fastest round (a call that another job on the
    machine interrupted in one round counts as it ran in another), "median" each call's median round."""
    samples: dict = {}

    for r in range(rounds + 1):
        for name, fn in runs.items():
            got: dict = {}

            def tick(call, *args, key=name):
                t = time.perf_counter()
                out = call(*args)
                got.setdefault(key, []).append(time.perf_counter() - t)
                return out
            fn(tick)
            if r:  # round 0 warms up
                for k, v in got.items():
                    samples.setdefault(k, []).append(v)
    out = {}
    for k, per_round in samples.items():
        t = np.asarray(per_round) * 1e3  # (rounds, calls) ms
        out[k] = {"best": float(t.min(axis=0).mean()), "median": float(np.median(t, axis=0).mean())}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dvt")
    ap.add_argument("--static")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runtimes", nargs="+", default=["onnx:fp32", "openvino:fp32", "openvino:bf16"])
    ap.add_argument("--json")
    args = ap.parse_args()
    dvt_dir, static_dir = exported(args)
    out = {}
    for item in args.runtimes:
        runtime, precision = item.split(":")
        model = dvt_core.build(str(dvt_dir), backend=runtime, precision=precision, threads=args.threads)
        static = dvt_core.build(str(static_dir), backend=runtime, precision=precision, threads=args.threads)
        images = test_images(model.spec, args.images)
        runs, exits = variants(model, static, runtime, precision, args.threads, images)
        row = measure(runs, args.rounds)
        reach = [(exits >= i).mean() for i in range(model.spec.num_exits)]
        staged = sum(reach[i] * row[f"stage {i + 1} in the cascade"]["best"] for i in range(len(reach)))
        row["split"] = {"stages in the cascade, weighted": staged, "host loop": row["host loop"]["best"],
                        "rest": row["adaptive"]["best"] - staged - row["host loop"]["best"],
                        "reach": [float(r) for r in reach]}
        out[item] = row
        report(item, row)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def report(label: str, row: dict) -> None:
    print(f"{label} (batch 1), ms per image, best / median:")
    for k, v in row.items():
        if k != "split":
            print(f"  {k:30s} {v['best']:7.3f} / {v['median']:7.3f}")
    s = row["split"]
    ratio = row["static run_stage"]["best"] / row["adaptive"]["best"]
    print(f"  adaptive over static: {ratio:.2f}x; adaptive = stages {s['stages in the cascade, weighted']:.3f} "
          f"(reached by {', '.join(f'{r:.2f}' for r in s['reach'])}) + host loop {s['host loop']:.3f} "
          f"+ rest {s['rest']:.3f} ms", flush=True)


if __name__ == "__main__":
    sys.exit(main())
