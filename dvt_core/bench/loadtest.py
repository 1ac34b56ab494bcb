"""A loopback load test of ``dvt serve``: the adaptive service against every stage and the static model.

:func:`launch` starts the real server (``python -m dvt_core serve ... --port 0``) on 127.0.0.1 and reads
the URL it prints; :func:`run_load` drives it with ``concurrency`` keep-alive HTTP clients (threads,
``http.client``; the tests' small floods), bounded in request count and time; :func:`benchmark` runs the
three services of :data:`VARIANTS` under the ``hey`` load generator (dvt_core.bench.hey), interleaved,
and reports throughput, p50 / p99 latency, server CPU per image, the MACs each answer reports, and the
in-process references. Only 127.0.0.1 is ever contacted.
"""
from __future__ import annotations

import contextlib
import http.client
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator, Optional, Sequence
from urllib.parse import urlsplit

import numpy as np

from dvt_core.errors import DVTError, InputError, ServerStartError
from dvt_core.runtime.builder import build

URL_LINE = re.compile(r"http://(127\.0\.0\.1|localhost|\[::1\]):(\d+)")


def check_loopback(url: str) -> tuple[str, int]:
    """(host, port) of ``url``; InputError unless it is on this machine (the load test sends nothing else)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1") or not parts.port:
        raise InputError(f"the load test only targets http://127.0.0.1:PORT on this machine, not {url!r}")
    return parts.hostname, parts.port


def predict_path(url: str) -> str:
    """``/v1/predict`` under the path of ``url`` (a Ray Serve route prefix, say)."""
    return urlsplit(url).path.rstrip("/") + "/v1/predict"


@contextlib.contextmanager
def launch(args: Sequence[str], startup_timeout: float = 180.0, threads: Optional[int] = None,
           stop_timeout: float = 60.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``dvt serve ARGS --host 127.0.0.1 --port 0`` and yield (its URL, the process); SIGTERM on exit.

    ``threads`` sets OMP_NUM_THREADS (the model's CPU threads) in the server's environment.
    """
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "dvt_core", "serve", *args, "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err_tail: list[str] = []
    threading.Thread(target=_drain, args=(proc.stderr, err_tail), daemon=True).start()
    try:
        url = _wait_for_url(proc, startup_timeout, err_tail)
        threading.Thread(target=_drain, args=(proc.stdout, []), daemon=True).start()
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _drain(stream, tail: list) -> None:
    for line in stream:
        tail.append(line)
        del tail[:-20]


def _wait_for_url(proc, timeout: float, err_tail: list) -> str:
    found: list = []

    def read():
        for line in proc.stdout:
            m = URL_LINE.search(line)
            if m:
                found.append(m.group(0))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        proc.kill()
        proc.wait(10)
        raise ServerStartError(f"dvt serve printed no URL within {timeout:g} s: {''.join(err_tail)[-800:]}")
    return found[0]


class Connection(http.client.HTTPConnection):
    """``http.client``'s keep-alive connection with TCP_NODELAY: it sends the headers and the body in two
    writes, which Nagle's algorithm and the peer's delayed ACK would otherwise hold up by ~40 ms."""

    def connect(self):
        import socket

        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def post(conn: http.client.HTTPConnection, body: bytes, path: str = "/v1/predict") -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def run_load(url: str, bodies: Sequence[bytes], concurrency: int, requests: int, max_seconds: float = 60.0,
             timeout: float = 30.0) -> dict:
    """``requests`` POSTs of ``bodies`` (round robin) from ``concurrency`` threads, each on its own keep-alive
    connection; stops early after ``max_seconds``. Throughput counts 200 answers per second of wall time."""
    host, port = check_loopback(url)
    path = predict_path(url)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(requests))
    lock = threading.Lock()
    stop_at = time.monotonic() + max_seconds

    def client():
        conn = Connection(host, port, timeout=timeout)
        try:
            while time.monotonic() < stop_at:
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                t0 = time.perf_counter()
                try:
                    status, _ = post(conn, bodies[k % len(bodies)], path)
                except (OSError, http.client.HTTPException):
                    status = 0  # a dropped connection: counted, and a fresh one for the next request
                    conn.close()
                    conn = Connection(host, port, timeout=timeout)
                dt = time.perf_counter() - t0
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(dt)
        finally:
            conn.close()

    workers = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join(max_seconds + timeout + 5)
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000.0
    return {"concurrency": concurrency, "requests": sum(statuses.values()), "ok": statuses.get(200, 0),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "seconds": wall,
            "throughput": statuses.get(200, 0) / wall if wall > 0 else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None}


def png_bodies(images: np.ndarray) -> list[bytes]:
    """Each uint8 image (H, W) or (H, W, 3) as the bytes of a PNG file."""
    from PIL import Image

    out = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def mean_macs(url: str, bodies: Sequence[bytes]) -> float:
    """The average MACs the service reports for ``bodies`` (one request each, one connection)."""
    import json

    host, port = check_loopback(url)
    conn = Connection(host, port, timeout=30)
    try:
        macs = []
        for body in bodies:
            status, data = post(conn, body, predict_path(url))
            if status != 200:
                raise ServerStartError(f"the service answered {status} to a test image: {data[:200]!r}")
            macs.append(json.loads(data)["macs"])
        return float(np.mean(macs))
    finally:
        conn.close()


def single_call_ms(model_name: str, images: np.ndarray, weights: str = "default", threads: Optional[int] = None,
                   repeats: int = 3) -> float:
    """Median ms of one in-process ``adaptive`` call on one image (decoded already), at the model's own
    thresholds: the reference for latency at low load."""
    from dvt_core.data.images import normalize
    from dvt_core.runtime.contract import backend_of
    from dvt_core.runtime.operating_point import model_thresholds

    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    model = build(model_name, weights=weights)
    b, spec = backend_of(model), model.spec
    t = model_thresholds(model, None)
    x = normalize(images, spec.mean, spec.std)
    times = []
    for _ in range(repeats):
        for k in range(len(x)):
            t0 = time.perf_counter()
            b.adaptive_numpy(model, x[k:k + 1], t)
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)


VARIANTS = {  # name -> dvt serve arguments
    "adaptive": ["--model", "dvt_fashion_mnist"],
    "every_stage": ["--model", "dvt_fashion_mnist", "--thresholds", "1e8,1e8"],
    "static": ["--model", "static_fashion_mnist_7x7"],
}


def test_images(limit: int = 1000) -> tuple[np.ndarray, str]:
    """The first ``limit`` Fashion-MNIST test images (the shipped subset where the data set is not installed)."""
    from dvt_core.data.sources import load_fashion_mnist

    try:
        images, _ = load_fashion_mnist("test")
        return images[:limit], "Fashion-MNIST test set"
    except DVTError:
        from pathlib import Path

        subset = Path(__file__).resolve().parents[1] / "assets" / "fashion_mnist_test_subset.npz"
        return np.load(subset)["images"][:limit], "shipped Fashion-MNIST test subset"


def gains(report: dict, key: str) -> dict:
    """adaptive over static throughput per concurrency, from ``report[key]``'s rows."""
    rows = report[key]
    return {str(a["concurrency"]): a["throughput"] / s["throughput"]
            for a, s in zip(rows["adaptive"], rows["static"]) if s["throughput"]}


def format_report(report: dict) -> str:
    """The figures of :func:`benchmark` as a text table, with the goals' ratios."""
    lines = [f"{'service':12s} {'conc':>4s} {'img/req':>7s} {'img/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} "
             f"{'CPU ms/img':>10s} {'outside':>8s}  statuses"]
    for key in ("results", "many_image_results"):
        for name, rows in report.get(key, {}).items():
            for r in rows:
                cpu, outside = r.get("server_cpu_ms_per_image"), r.get("outside_model_cpu_ms_per_image")
                lines.append(f"{name:12s} {r['concurrency']:4d} {r.get('images_per_request', 1):7d} "
                             f"{r['throughput']:8.1f} {r['p50_ms'] or 0:8.2f} {r['p99_ms'] or 0:8.2f} "
                             f"{'-' if cpu is None else f'{cpu:.3f}':>10s} "
                             f"{'-' if outside is None else f'{outside:.3f}':>8s}  {r['statuses']}")
    macs = report["macs_per_image"]
    lines.append("MACs per image: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in macs.items()))
    gain = report["mac_predicted_gain"]
    for key, what in (("results", "one image per request"), ("many_image_results", "many images per request")):
        if key in report:
            lines.append(f"MAC-predicted gain over static: {gain:.2f}x; measured, {what}: " + ", ".join(
                f"c={c} {g:.2f}x ({g / gain:.2f} of it)" for c, g in gains(report, key).items()))
    if report.get("in_process_img_s"):
        many = report["many_image_results"]["adaptive"]
        lines.append(f"in-process streaming early exit: {report['in_process_img_s']:.1f} img/s, model CPU "
                     f"{report['model_cpu_ms_per_image']:.3f} ms/img; /v2 many-image service: " + ", ".join(
                         f"c={r['concurrency']} {r['throughput'] / report['in_process_img_s']:.2f}x of it, server "
                         f"CPU outside the model {r.get('outside_model_cpu_ms_per_image') or 0:.3f} ms/img (over the "
                         f"in-process cost {(r['server_cpu_ms_per_image'] or 0) - report['model_cpu_ms_per_image']:.3f})"
                         for r in many))
    if report.get("single_call_ms") is not None:
        low = report["results"]["adaptive"][0]
        lines.append(f"one in-process adaptive call on one image: {report['single_call_ms']:.2f} ms (median); "
                     f"service p99 at concurrency {low['concurrency']}: {low['p99_ms'] or 0:.2f} ms "
                     f"(goal: at most {1.5 * report['single_call_ms'] + 1:.2f} ms)")
    return "\n".join(lines)
