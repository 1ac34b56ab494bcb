"""Framework-free pieces of ``dvt benchmark``: interleaved timing, the figures of one variant, and
thresholds that two runtimes apply alike. The framework side lives in ``dvt_backends.torch.benchmark``."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from dvt_core.runtime.builder import build
from dvt_core.runtimes import import_runtime

# find_thresholds puts each threshold exactly on one image's confidence. The runtimes' logits differ in
# the last bits (about 1e-6), so that image could leave in one and go on in the other; a threshold up to
# this much lower makes it leave in both, and both runtimes then take the same exits (checked, reported).
EXIT_TIE_MARGIN = 1e-5


def tie_safe_thresholds(probs: np.ndarray, thresholds: np.ndarray, margin: float = EXIT_TIE_MARGIN) -> np.ndarray:
    """``thresholds`` (max-softmax, from ``policy.find_thresholds`` on ``probs``) each lowered off the confidence
    it sits on: by ``margin``, or by half the gap to the next lower confidence among the images still there
    when that is less, so that every image takes the same exit as before and a last-bit difference between
    two runtimes cannot move the image on the threshold."""
    conf = np.asarray(probs, np.float32).max(-1)  # (exits, images), compared in float32 as the runtimes do
    out = np.asarray(thresholds, np.float32).copy()
    left = np.ones(conf.shape[1], bool)
    for k in range(conf.shape[0] - 1):
        c = conf[k][left]
        t = float(out[k])
        taken = c >= t
        if taken.any() and not taken.all():
            t -= min(margin, (t - float(c[~taken].max())) / 2)
        elif taken.any():
            t -= margin
        out[k] = t
        left[left] = c < out[k]
    return out


def time_interleaved(runs: dict, warmup: int, repeats: int) -> dict:
    """Seconds per call of every ``runs`` entry: ``warmup`` untimed rounds, then ``repeats`` timed rounds, each
    round calling every entry once, so that a change in machine load hits them alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def figures(seconds: list, n: int) -> dict:
    best, med = min(seconds), statistics.median(seconds)
    return {"ms_per_image_best": best / n * 1e3, "ms_per_image_median": med / n * 1e3,
            "images_per_s_best": n / best, "images_per_s_median": n / med}


def timed_count(batch: int, images: int) -> int:
    """Images timed at ``batch``: at least ``images`` and one batch, whole batches only."""
    n = max(batch, images)
    return n - n % batch


# ---- timing over the runtime contract: any runtime's DVT against the same runtime's static backbone ------------
# Everything below calls a model only through its backend's contract members (backend_of(model).run_stage, ...):
# torch, ONNX Runtime and OpenVINO models are timed by the same code. A runtime's extras (timm's model for torch)
# come in as ``references``: name -> (call on the runtime's input batch, MACs per image).

GOAL_RATIO = 0.9  # realised speed-up over the static model / the MACs' prediction at which early exit "pays"


@dataclass
class Subject:
    """One runtime at one precision: its DVT, its static backbone (same runtime, same precision) and extras."""

    label: str  # "torch bf16"
    model: Any
    static: Any
    references: dict = field(default_factory=dict)


def _backend(model):
    from dvt_core.runtime.contract import backend_of

    return backend_of(model)


def _inputs(model, chunks: Sequence[np.ndarray]) -> list:
    b = _backend(model)
    return [b.to_tensor(model, c) for c in chunks]


def _run_all(model, x, upto: Optional[int] = None):
    """Every stage (or the first ``upto + 1``) on ``x``, every image going on: the last logits, on the host."""
    b = _backend(model)
    carry, last = None, (model.spec.num_exits - 1 if upto is None else upto)
    for i in range(last + 1):
        logits, carry = b.run_stage(model, i, x, carry)
    return b.to_numpy(logits)


def adaptive_call(model, thresholds, confidence: str = "max_softmax") -> Callable:
    """``call(x) -> AdaptiveResult``: true early exit of one input batch (the contract's ``adaptive``)."""
    b = _backend(model)
    return lambda x: b.adaptive(model, x, thresholds, confidence)


def exit_probs(model, chunks: Sequence[np.ndarray]) -> np.ndarray:
    """Softmax of every exit over numpy ``chunks``: (exits, N, classes) float32 (for thresholds)."""
    b = _backend(model)
    out = []
    with b.inference(model):
        for x in _inputs(model, chunks):
            carry, per_exit = None, []
            for i in range(model.spec.num_exits):
                logits, carry = b.run_stage(model, i, x, carry)
                z = b.to_numpy(logits).astype(np.float64)
                z = np.exp(z - z.max(-1, keepdims=True))
                per_exit.append((z / z.sum(-1, keepdims=True)).astype(np.float32))
            out.append(np.stack(per_exit))
    return np.concatenate(out, axis=1)


def speedups(times: dict, macs: dict, base: str = "adaptive") -> dict:
    """Per variant: its figures, MACs per image and, against ``base``, predicted / realised speed-up and ratio."""
    best = min(times[base])
    out = {}
    for k, ts in times.items():
        v = {"seconds_best": min(ts), "macs_per_image": macs[k]}
        if k != base:
            v["predicted_speedup"] = macs[k] / macs[base]
            v["realised_speedup"] = min(ts) / best
            v["ratio"] = v["realised_speedup"] / v["predicted_speedup"]
        out[k] = v
    return out


def time_adaptive(subject: Subject, chunks: Sequence[np.ndarray], thresholds, warmup: int, repeats: int) -> dict:
    """Mode "adaptive": per-batch early exit against all exits, the static backbone and the references,
    interleaved, each on the same input batches already in the runtime's form."""
    model, static = subject.model, subject.static
    n = sum(len(c) for c in chunks)
    xs, xs_static = _inputs(model, chunks), _inputs(static, chunks)
    results: list = []
    call = adaptive_call(model, thresholds)
    sb = _backend(static)

    def adaptive():
        results[:] = [call(x) for x in xs]

    def static_run():
        with sb.inference(static):
            for x in xs_static:
                _run_all(static, x)

    def all_exits():
        with _backend(model).inference(model):
            for x in xs:
                _run_all(model, x)

    runs = {"adaptive": adaptive, "all exits": all_exits, "static": static_run}
    for name, (fn, _) in subject.references.items():
        runs[name] = (lambda f: lambda: [f(x) for x in xs])(fn)
    times = time_interleaved(runs, warmup, repeats)
    if not results:
        adaptive()
    exits = np.concatenate([np.asarray(r.exit_index) for r in results])
    mean_macs = float(np.concatenate([np.asarray(r.macs) for r in results]).mean())
    macs = {"adaptive": mean_macs, "all exits": model.exit_macs[-1], "static": static.exit_macs[-1],
            **{k: m for k, (_, m) in subject.references.items()}}
    variants = speedups(times, macs)
    for k, v in variants.items():
        v.update(figures(times[k], n))
    return {"mode": "adaptive", "images": n, "batch": len(chunks[0]), "mean_macs": mean_macs,
            "exit_index": exits.tolist(),
            "exit_shares": (np.bincount(exits, minlength=model.spec.num_exits) / n).tolist(), "variants": variants}


def time_streaming(subject: Subject, chunks: Sequence[np.ndarray], thresholds, warmup: int, repeats: int) -> dict:
    """Mode "streaming": the stages' queues fill across input batches (dvt_core.runtime.streaming) against
    per-batch early exit and the static backbone, each from the same numpy batches (conversion included)."""
    from dvt_core.runtime.streaming import stream_adaptive

    model, static = subject.model, subject.static
    n, batch = sum(len(c) for c in chunks), len(chunks[0])
    call = adaptive_call(model, thresholds)
    sb = _backend(static)
    out: dict = {}

    def streaming():
        out["streaming"] = stream_adaptive(model, chunks, thresholds, batch)

    def per_batch():
        b = _backend(model)
        out["per-batch"] = [call(b.to_tensor(model, c)) for c in chunks]

    def static_run():
        with sb.inference(static):
            for c in chunks:
                _run_all(static, sb.to_tensor(static, c))

    times = time_interleaved({"streaming": streaming, "per-batch adaptive": per_batch, "static": static_run},
                             warmup, repeats)
    if not out:
        streaming()
        per_batch()
    mean_macs = float(np.asarray(out["streaming"].macs).mean())
    macs = {"streaming": mean_macs, "per-batch adaptive": mean_macs, "static": static.exit_macs[-1]}
    variants = speedups(times, macs, base="streaming")
    for k, v in variants.items():
        v.update(figures(times[k], n))
    same = bool((np.asarray(out["streaming"].exit_index)
                 == np.concatenate([np.asarray(r.exit_index) for r in out["per-batch"]])).all())
    return {"mode": "streaming", "images": n, "batch": batch, "mean_macs": mean_macs, "same_exits": same,
            "variants": variants}


def time_stages(subject: Subject, chunks: Sequence[np.ndarray], warmup: int, repeats: int) -> dict:
    """Mode "stages": each stage alone (its reuse inputs computed beforehand, every image going on) against
    the static backbone, as MACs per second: where the cascade loses the static model's efficiency; and each
    stage's time inside the whole cascade (the stages run in turn on every batch) against its time alone."""
    from dvt_core.model.macs import stage_macs

    model, static = subject.model, subject.static
    b, sb = _backend(model), _backend(static)
    n = sum(len(c) for c in chunks)
    xs, xs_static = _inputs(model, chunks), _inputs(static, chunks)
    carries = _stage_inputs(model, xs)

    def stage(i):
        def go():
            with b.inference(model):
                for x, c in zip(xs, carries[i]):
                    b.to_numpy(b.run_stage(model, i, x, c)[0])
        return go

    def static_run():
        with sb.inference(static):
            for x in xs_static:
                _run_all(static, x)

    # The same stages run one after another on each batch, as the cascade runs them, each timed on its own:
    # at small batches a stage is slower there than alone (the other stages' weights have pushed its own out
    # of the caches), which is the part of the cascade's cost that no per-stage figure shows.
    num_exits = model.spec.num_exits
    in_cascade: list = []

    def cascade_run():
        from dvt_core.runtime.cost_model import stage_seconds

        with b.inference(model):
            in_cascade.append(stage_seconds(model, xs).tolist())

    runs = {f"stage {i + 1}": stage(i) for i in range(num_exits)}
    runs["static"] = static_run
    runs["cascade"] = cascade_run
    times = time_interleaved(runs, warmup, repeats)
    del times["cascade"], in_cascade[:warmup]
    macs = {f"stage {i + 1}": stage_macs(model.spec, i) for i in range(num_exits)}
    macs["static"] = static.exit_macs[-1]
    return {"mode": "stages", "images": n, "batch": len(chunks[0]), "variants": _stage_rows(times, macs, in_cascade, n)}


def _stage_inputs(model, xs: list) -> list:
    """Per stage, per chunk of ``xs``: the carry that stage reads (the previous stage's output; None first)."""
    b = _backend(model)
    carries = []
    with b.inference(model):
        per_chunk = [None] * len(xs)
        for i in range(model.spec.num_exits):
            carries.append(list(per_chunk))
            per_chunk = [b.run_stage(model, i, x, c)[1] for x, c in zip(xs, per_chunk)]
    return carries


def _stage_rows(times: dict, macs: dict, in_cascade: list, n: int) -> dict:
    """Each stage's and the static model's figures, MACs per second against the static model's, and each
    stage's best time inside the cascade against its time alone."""
    static_rate = macs["static"] * n / min(times["static"])
    rows = {}
    for k, ts in times.items():
        rate = macs[k] * n / min(ts)
        rows[k] = {**figures(ts, n), "macs_per_image": macs[k], "macs_per_s": rate,
                   "of_static": rate / static_rate}
    for i in range(len(macs) - 1):
        best = min(per[i] for per in in_cascade)
        row = rows[f"stage {i + 1}"]
        row["ms_per_image_in_cascade"] = best / n * 1e3
        row["in_cascade_of_alone"] = best / min(times[f"stage {i + 1}"])
    return rows


def verdict(label: str, row: dict, base: str = "static") -> str:
    """The line a person reads: does early exit pay against the static model at this batch size?"""
    v = row["variants"][base]
    realised, predicted, ratio = v["realised_speedup"], v["predicted_speedup"], v["ratio"]
    where = f"{label}, batch {row['batch']}"
    tail = f"(MACs predict {predicted:.2f}x; ratio {ratio:.2f})"
    if realised >= 1 and ratio >= GOAL_RATIO:
        return f"early exit pays: {realised:.2f}x faster than static at {where} {tail}"
    if realised >= 1:
        return f"early exit is faster but short of the MACs: {realised:.2f}x faster than static at {where} {tail}"
    return f"early exit does not pay: {1 / realised:.2f}x slower than static at {where} {tail}"


# ---- what is timed: subjects built through dvt_core.build, images, thresholds --------------------------------

RUNTIMES = ("torch", "onnx", "openvino", "pt2")
EXPORT_FORMAT = {"onnx": "onnx", "openvino": "onnx", "pt2": "pt2"}  # the export folder each exported runtime runs
MODES = ("adaptive", "stages", "streaming")


def sibling_export(directory, static_name: str):
    """The export folder of ``static_name`` beside ``directory`` (its manifest names that model), or None."""
    from pathlib import Path

    from dvt_core.errors import DVTError
    from dvt_core.export.manifest import read_manifest

    for d in sorted(Path(directory).resolve().parent.iterdir()):
        if d.is_dir() and d != Path(directory).resolve():
            try:
                read_manifest(d, model=static_name)
            except (DVTError, OSError):
                continue
            return d
    return None


def build_subject(runtime: str, precision: str, name: str, weights, overrides: dict, threads: Optional[int],
                  workdir, seed: int = 0, compile: bool = False, no_timm: bool = False,
                  device: Optional[str] = None, trust_native_code: bool = False) -> Subject:
    """``runtime``'s DVT and static backbone at ``precision``. torch builds both (random weights unless
    ``weights``); an exported runtime loads ``weights`` when it is an export folder (the static model's
    export beside it) and otherwise exports both from torch into ``workdir``."""
    from pathlib import Path

    from dvt_core.model.zoo import static_spec

    if runtime == "torch":
        model = _seeded_torch(name, weights, overrides, seed, precision)
        static = build(static_spec(model.spec, model.spec.num_exits - 1), precision=precision)
        if device is not None:
            model, static = (_backend(m).to_device(m, device) for m in (model, static))
        if compile:
            model.compile()
            static.compile()
        refs = {} if no_timm else framework_side("torch").references(model, static)
        return Subject(f"torch {precision}", model, static, refs)
    fmt = EXPORT_FORMAT[runtime]
    if weights is not None and _is_dir(weights):
        model = build(weights, backend=runtime, precision=precision, threads=threads,
                      trust_native_code=trust_native_code)
        static_name = static_spec(model.spec, model.spec.num_exits - 1).name
        static_dir = sibling_export(weights, static_name)
    else:
        model, static_dir = None, None
    if model is None or static_dir is None:
        from dvt_core.export.writer import export_model

        # pt2 packages are compiled in the precision they run in; ONNX graphs stay fp32 (the runtime casts)
        form = {"precision": precision} if fmt == "pt2" else {}
        src = _seeded_torch(name, weights, overrides, seed, "fp32")
        tag = Path(workdir) / f"{fmt}-{id(src)}"
        tag.mkdir()  # inside the benchmark's own temporary folder: exports never create folders themselves
        if model is None:
            model = build(export_model(src, fmt, tag / "dvt", **form), backend=runtime, precision=precision,
                          threads=threads, trust_native_code=True)  # compiled here, just now
        src_static = build(static_spec(src.spec, src.spec.num_exits - 1))
        static_dir = export_model(src_static, fmt, tag / "static", **form)
    static = build(static_dir, backend=runtime, precision=precision, threads=threads,
                   trust_native_code=trust_native_code or Path(static_dir).resolve().is_relative_to(Path(workdir).resolve()))
    if device is not None:
        model, static = (_backend(m).to_device(m, device) for m in (model, static))
    return Subject(f"{runtime} {precision}", model, static)


def framework_side(name: str):
    """Framework ``name``'s side of a benchmark (``setup`` of threads and device, ``seed_weights``,
    ``references``: other libraries' static models), its ``benchmark`` module reached through the registry."""
    return import_runtime(name, "benchmark")


def setup_framework(name: str, device: str, threads) -> dict:
    """``threads`` applied and ``device`` checked by framework ``name`` (InputError when it cannot use it);
    what was set (versions, threads, device)."""
    return framework_side(name).setup(device, threads)


def _seeded_torch(name, weights, overrides, seed, precision):
    """The torch DVT (random weights seeded, unless ``weights`` is a checkpoint; an export folder is not)."""
    framework_side("torch").seed_weights(seed)
    checkpoint = None if weights is not None and _is_dir(weights) else weights
    return build(name, weights=checkpoint, precision=precision, **overrides)


def _is_dir(path) -> bool:
    from pathlib import Path

    return Path(str(path)).is_dir()


def benchmark_images(model, count: int, seed: int) -> tuple[np.ndarray, str]:
    """``count`` float32 images for ``model``: its checkpoint's data set's test images when it names one
    that is installed (so that the stored operating point splits them as it was calibrated to), else
    seeded random ones; and a phrase saying which."""
    from dvt_core.errors import DVTError

    spec, meta = model.spec, getattr(model, "checkpoint_meta", None) or {}
    if meta.get("dataset") and meta.get("thresholds") is not None:
        try:
            from dvt_core.data.datasets import load_dataset
            from dvt_core.data.images import normalize

            x, _, _ = load_dataset(meta["dataset"], "test", spec)
            reps = -(-count // len(x))
            x = np.concatenate([x] * reps)[:count]
            return normalize(x, spec.mean, spec.std).astype(np.float32), f"{meta['dataset']} test images"
        except DVTError:
            pass
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, spec.in_chans, spec.img_size, spec.img_size), dtype=np.float32)
    return x, "random images"
