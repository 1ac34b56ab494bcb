"""``dvt benchmark --serve``'s load: `hey <https://github.com/rakyll/hey>`_ (an OS package) drives ``dvt serve``
on 127.0.0.1 with one-image ``/v1/predict`` requests and many-image ``/v2`` binary-tensor requests,
bounded in count and time; the server's CPU time is read from /proc around each run.

Reported per run: images per second, p50 / p99 request latency (hey's own per-request times), the server's
CPU time per image, and its CPU time per image outside the model: the process's CPU time over the run less
what the server's own scheduler spent in the model's stages (``dvt_model_cpu_seconds_total`` in its
``/metrics``). The report also sets the server's CPU against the in-process cost of the same images at
batch 64 (:func:`model_cpu_per_image`), which counts smaller server batches against the service too.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from dvt_core.errors import InputError
from dvt_core.bench.loadtest import (VARIANTS, Connection, check_loopback, gains, launch, mean_macs, png_bodies,
                                     single_call_ms, test_images)

HOW_TO_INSTALL = ("the serving load test needs the `hey` load generator: install it with `apt-get install hey` "
                  "(Debian, Ubuntu) or `go install github.com/rakyll/hey@latest`")


def hey_path() -> str:
    """Where ``hey`` is; InputError saying how to install it when it is not on PATH."""
    path = shutil.which("hey")
    if path is None:
        raise InputError(HOW_TO_INSTALL)
    return path


def v2_binary_body(images: np.ndarray) -> tuple[bytes, str]:
    """(body, Inference-Header-Content-Length) of a ``/v2`` request sending ``images`` (uint8) as one
    binary tensor, answers asked for as binary tensors too."""
    head = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape),
                                   "parameters": {"binary_data_size": int(images.nbytes)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + np.ascontiguousarray(images).tobytes(), str(len(head))


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its threads so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def model_cpu_seconds(url: str) -> float:
    """The CPU seconds the service at ``url`` has spent in the model (``dvt_model_cpu_seconds_total``)."""
    host, port = check_loopback(url)
    conn = Connection(host, port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("dvt_model_cpu_seconds_total "))


def run_hey(url: str, path: str, body: bytes, concurrency: int, requests: int, headers: Optional[dict] = None,
            max_seconds: float = 60.0, request_timeout_s: int = 30) -> dict:
    """``requests`` POSTs of ``body`` to ``url + path`` from ``concurrency`` hey workers (keep-alive),
    stopped after ``max_seconds``, each request given up after ``request_timeout_s`` (hey then leaves it
    out of its CSV: fewer rows than requests): statuses, seconds, requests/s, p50 / p99 ms."""
    check_loopback(url)
    with tempfile.NamedTemporaryFile(suffix=".body") as f:
        f.write(body)
        f.flush()
        cmd = [hey_path(), "-n", str(max(requests, concurrency)), "-c", str(concurrency), "-m", "POST",
               "-t", str(int(request_timeout_s)), "-o", "csv", "-D", f.name, "-T", (headers or {}).get("Content-Type", "application/octet-stream")]
        for k, v in (headers or {}).items():
            if k != "Content-Type":
                cmd += ["-H", f"{k}: {v}"]
        start = time.perf_counter()
        try:
            out = subprocess.run(cmd + [url + path], capture_output=True, text=True, timeout=max_seconds + 35).stdout
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        wall = time.perf_counter() - start
    rows = list(csv.DictReader(io.StringIO(out)))
    statuses: dict = {}
    for r in rows:
        statuses[r["status-code"]] = statuses.get(r["status-code"], 0) + 1
    ok = np.asarray([float(r["response-time"]) for r in rows if r["status-code"] == "200"]) * 1000.0
    span = max((float(r["offset"]) + float(r["response-time"]) for r in rows), default=wall)
    return {"concurrency": concurrency, "requests": len(rows), "statuses": dict(sorted(statuses.items())),
            "seconds": span, "requests_per_s": len(ok) / span if span > 0 else 0.0,
            "p50_ms": float(np.percentile(ok, 50)) if len(ok) else None,
            "p99_ms": float(np.percentile(ok, 99)) if len(ok) else None}


def model_cpu_per_image(model_name: str, images: np.ndarray, threads: Optional[int], batch: int = 64,
                        thresholds=None) -> tuple[float, float]:
    """(CPU seconds per image, images per second) of in-process streaming early exit on ``images`` at
    the model's thresholds (or ``thresholds``): what the model itself costs, and the throughput to compare."""
    from dvt_core.data.images import normalize
    from dvt_core.runtime.builder import build
    from dvt_core.runtime.contract import backend_of
    from dvt_core.runtime.operating_point import model_thresholds
    from dvt_core.runtime.streaming import stream_adaptive

    model = build(model_name, weights="default")
    if threads is not None:
        backend_of(model).set_threads(model, threads)
    x = normalize(images, model.spec.mean, model.spec.std)
    t = model_thresholds(model, thresholds)
    chunks = [x[s:s + batch] for s in range(0, len(x), batch)]
    stream_adaptive(model, chunks, t, batch)  # warm-up
    best_cpu, best_wall = float("inf"), float("inf")
    for _ in range(3):
        c0, w0 = time.process_time(), time.perf_counter()
        stream_adaptive(model, chunks, t, batch)
        best_cpu, best_wall = min(best_cpu, time.process_time() - c0), min(best_wall, time.perf_counter() - w0)
    return best_cpu / len(x), len(x) / best_wall


def _one_image_run(url: str, bodies: list, concurrency: int, requests: int, max_seconds: float) -> dict:
    """One-image ``/v1/predict`` requests: hey sends one body per run, so the images take turns (up to 8,
    ``requests`` shared between them); statuses and times are summed; p50 is the runs' median p50, p99
    their largest p99."""
    # hey sends n // c requests per worker: as many turns as split ``requests`` exactly, 8 at most
    fits = [t for t in range(1, min(8, len(bodies)) + 1) if requests % (t * concurrency) == 0]
    turns = bodies[:max(fits) if fits else min(8, len(bodies))]
    runs = [run_hey(url, "/v1/predict", body, concurrency, max(1, requests // len(turns)),
                    {"Content-Type": "application/octet-stream"}, max_seconds / len(turns)) for body in turns]
    return _merged(runs, images_per_request=1)


def _merged(runs: list, images_per_request: int) -> dict:
    statuses: dict = {}
    for r in runs:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    seconds = sum(r["seconds"] for r in runs)
    ok = statuses.get("200", 0)
    p50 = [r["p50_ms"] for r in runs if r["p50_ms"] is not None]
    p99 = [r["p99_ms"] for r in runs if r["p99_ms"] is not None]
    return {"concurrency": runs[0]["concurrency"], "images_per_request": images_per_request,
            "requests": sum(r["requests"] for r in runs), "statuses": statuses, "seconds": seconds,
            "throughput": ok * images_per_request / seconds if seconds > 0 else 0.0,
            "p50_ms": float(np.median(p50)) if p50 else None, "p99_ms": max(p99) if p99 else None}


def _measured(url: str, proc, run) -> dict:
    """``run()``'s result with the server's CPU milliseconds per image answered over it, all of it and outside
    the model (less what its scheduler spent in the model's stages)."""
    c0, m0 = server_cpu_seconds(proc.pid), model_cpu_seconds(url)
    res = run()
    cpu, model = server_cpu_seconds(proc.pid) - c0, model_cpu_seconds(url) - m0
    images = res["statuses"].get("200", 0) * res["images_per_request"]
    res["server_cpu_ms_per_image"] = cpu * 1000.0 / images if images else None
    res["outside_model_cpu_ms_per_image"] = (cpu - model) * 1000.0 / images if images else None
    return res


def compare(images: np.ndarray, concurrencies=(1, 16), requests: int = 400, rounds: int = 2, max_batch: int = 32,
            max_wait_ms: float = 2.0, threads: Optional[int] = None, images_per_request: int = 64,
            max_seconds: float = 60.0, log=None) -> dict:
    """The three services of ``loadtest.VARIANTS`` under hey, interleaved, best of ``rounds``: one-image
    ``/v1`` requests (``results``) and ``images_per_request``-image ``/v2`` binary requests
    (``many_image_results``), at each concurrency; the MACs each service reports per image."""
    import contextlib


    hey_path()  # refused before any server starts
    bodies = png_bodies(images[:max(8, min(requests, len(images)))])
    many, header_len = v2_binary_body(images[:images_per_request])
    many_requests = max(8, requests // images_per_request)  # enough requests for a p99 at any size
    extra = ["--max-batch", str(max_batch), "--max-wait-ms", f"{max_wait_ms:g}", "--queue-limit", "4096"]
    best: dict = {"results": {n: {} for n in VARIANTS}, "many_image_results": {n: {} for n in VARIANTS}}
    with contextlib.ExitStack() as stack:
        servers = {n: stack.enter_context(launch([*args, *extra], threads=threads)) for n, args in VARIANTS.items()}
        macs = {n: mean_macs(url, bodies) for n, (url, _) in servers.items()}
        for r in range(rounds):
            for c in concurrencies:
                for name, (url, proc) in servers.items():
                    path = f"/v2/models/{VARIANTS[name][1]}/infer"
                    one = _measured(url, proc, lambda: _one_image_run(url, bodies, c, requests, max_seconds))
                    more = _measured(url, proc, lambda: _merged([run_hey(
                        url, path, many, c, many_requests, {"Inference-Header-Content-Length":
                                                                           header_len}, max_seconds)],
                        images_per_request))
                    for key, res in (("results", one), ("many_image_results", more)):
                        if log is not None:
                            log(f"round {r + 1} c={c:3d} {name:12s} {res['images_per_request']:3d} img/request "
                                f"{res['throughput']:8.1f} img/s  p50 {res['p50_ms'] or 0:7.2f} ms  "
                                f"p99 {res['p99_ms'] or 0:7.2f} ms  {res['statuses']}")
                        if c not in best[key][name] or res["throughput"] > best[key][name][c]["throughput"]:
                            best[key][name][c] = res
    return {"images": len(images), "requests_per_run": requests, "rounds": rounds, "max_batch": max_batch,
            "max_wait_ms": max_wait_ms, "threads": threads, "precision": "float32", "client": "hey",
            "images_per_request": images_per_request, "macs_per_image": macs,
            **{key: {n: [rows[c] for c in concurrencies] for n, rows in best[key].items()} for key in best}}


def benchmark(limit: int = 1000, concurrencies: Sequence[int] = (1, 16), requests: int = 400,
              rounds: int = 2, max_batch: int = 32, max_wait_ms: float = 2.0, threads: Optional[int] = 1,
              images_per_request: int = 64, log=None) -> dict:
    """The three services driven by hey (dvt_core.bench.hey.compare) on the first ``limit`` test images,
    with the in-process references (one call on one image; streaming early exit's throughput and model
    CPU per image) and a note of the machine. What ``dvt benchmark --serve`` and benchmarks/bench_serve.py run."""
    import platform

    images, source = test_images(limit)
    report = compare(images, concurrencies, requests, rounds, max_batch, max_wait_ms, threads,
                     images_per_request=images_per_request, log=log)
    macs = report["macs_per_image"]
    report["mac_predicted_gain"] = macs["static"] / macs["adaptive"]
    report["throughput_gain"] = gains(report, "results")
    report["many_image_throughput_gain"] = gains(report, "many_image_results")
    report["gain_over_every_stage"] = {str(a["concurrency"]): a["throughput"] / e["throughput"] for a, e in zip(
        report["results"]["adaptive"], report["results"]["every_stage"]) if e["throughput"]}
    cpu, rate = model_cpu_per_image("dvt_fashion_mnist", images[:images_per_request * 4], threads)
    report["model_cpu_ms_per_image"], report["in_process_img_s"] = cpu * 1000.0, rate
    report["single_call_ms"] = single_call_ms("dvt_fashion_mnist", images[:100], threads=threads)
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} cores; server threads (OMP_NUM_THREADS) {threads}"
    report["source"] = source
    return report
