"""dvt serve: the per-stage scheduler (in process) and the real HTTP service (a subprocess on 127.0.0.1).

Answers are checked against ``dvt predict --json`` on the same files and against the library's adaptive
on the same images; bad input, oversized and slow bodies, a full queue, floods, metrics and SIGTERM
are checked on the running service, which must stay healthy.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import dvt_core
from dvt_core.bench import loadtest
from dvt_core.errors import QueueFullError
from dvt_core.serve.scheduler import StageScheduler

from helpers import cli

REPO = Path(__file__).resolve().parents[1]
SUBSET = np.load(REPO / "dvt_core" / "assets" / "fashion_mnist_test_subset.npz")["images"]


@pytest.fixture(scope="module")
def model():
    return dvt_core.build("dvt_fashion_mnist", weights="default")


def _normalised(model, images):
    from dvt_core.data.sources import normalize

    return normalize(images, model.spec.mean, model.spec.std)


# ---- the scheduler, in process ------------------------------------------------------------------

def test_scheduler_answers_like_adaptive_and_batches_later_stages_across_requests(model):
    from dvt_core.runtime.contract import backend_of
    from dvt_core.runtime.operating_point import model_thresholds

    t = model_thresholds(model, None)
    x = _normalised(model, SUBSET[:200])
    want = backend_of(model).adaptive_numpy(model, x, t)
    assert 0 < want.exit_counts[0] < 200 and want.exit_counts[1:].sum() > 0  # every path is exercised
    sched = StageScheduler(model, t, max_batch=16, max_wait_ms=50, queue_limit=1000)
    try:
        futures = [sched.submit(img) for img in x]  # all at once: stage 1 runs full batches
        got = [f.result(timeout=60) for f in futures]
    finally:
        sched.close(timeout=30)
    assert [g.stage_index for g in got] == want.exit_index.tolist()
    assert [g.exit for g in got] == want.exit.tolist()
    assert [g.class_index for g in got] == want.prediction.tolist()
    np.testing.assert_allclose([g.confidence for g in got], want.confidence, rtol=1e-4, atol=1e-5)
    assert [g.macs for g in got] == want.macs.tolist()
    # stage 2 ran on images gathered from several stage-1 batches: fewer runs than stage 1
    assert 200 // 16 + 1 <= sched.stage_runs[0] <= 200 // 16 + 3  # full batches of 16 (submitted within 50 ms)
    assert sched.stage_runs[1] < sched.stage_runs[0]
    assert sched.pending == 0 and sched.depths() == [0, 0, 0]


def test_scheduler_refuses_at_once_when_full_and_answers_the_queued_on_close(model):
    x = _normalised(model, SUBSET[:4])
    sched = StageScheduler(model, [1e8, 1e8], max_batch=8, max_wait_ms=10_000, queue_limit=3)
    futures = [sched.submit(img) for img in x[:3]]
    t0 = time.perf_counter()
    with pytest.raises(QueueFullError):
        sched.submit(x[3])
    assert time.perf_counter() - t0 < 0.5
    assert not any(f.done() for f in futures)  # waiting for a fuller batch (deadline 10 s away)
    sched.close(timeout=30)  # close runs what is queued without waiting for the deadline
    assert [f.result(timeout=0).stage_index for f in futures] == [2, 2, 2]


def test_adapting_the_thresholds_holds_the_mac_budget(model):
    x = _normalised(model, SUBSET[:1000])
    budget = 3.0e6
    start = [0.999, 0.999]  # far too costly: most images would run to the last exit
    sched = StageScheduler(model, start, max_batch=16, max_wait_ms=1, queue_limit=2000, adapt_budget=budget,
                           adapt_window=32)
    try:
        macs = []
        for s in range(0, 1000, 50):  # arrivals in waves, as under load
            macs += [f.result(timeout=60).macs for f in [sched.submit(img) for img in x[s:s + 50]]]
    finally:
        sched.close(timeout=30)
    first, last = np.mean(macs[:100]), np.mean(macs[-400:])
    assert first > 2 * budget  # where the given thresholds put it
    assert abs(last - budget) / budget < 0.2, (first, last)
    assert sched.thresholds[0] < 0.999 and sched.controller.shift < 0


def test_scheduler_refuses_bad_limits(model):
    with pytest.raises(dvt_core.InputError, match="max batch"):
        StageScheduler(model, [0.5, 0.5], max_batch=0)


def test_healthz_names_the_trained_model_and_a_request_is_answered_in_columns(model):
    """/healthz says the name the weights were trained under (the architecture's stays in the /v2 routes); a
    many-image request comes back as columns equal to the library's adaptive; the model's CPU is counted."""
    import asyncio
    from types import SimpleNamespace

    from dvt_core.runtime.contract import backend_of
    from dvt_core.serve.app import PredictService, respond

    def get(path):
        return asyncio.run(respond(service, SimpleNamespace(method="GET", url=SimpleNamespace(path=path), headers={})))

    meta = dict(model.checkpoint_meta)
    model.checkpoint_meta = {**meta, "name": "shoes_and_shirts"}
    try:
        service = PredictService(model, [0.6, 0.8])
    finally:
        model.checkpoint_meta = meta
    try:
        resp = get("/healthz")
        assert resp.status_code == 200 and json.loads(resp.body) == {"status": "ok", "model": "shoes_and_shirts"}
        assert get("/v2/models/dvt_fashion_mnist").status_code == 200
        assert get("/v2/models/shoes_and_shirts").status_code == 404
        x = _normalised(model, SUBSET[:40])
        want = backend_of(model).adaptive_numpy(model, x, [0.6, 0.8])
        assert 0 < want.exit_counts[0] < 40 and want.exit_counts[1:].sum() > 0
        got = asyncio.run(service.predict_many(x))
        assert got.class_index.tolist() == want.prediction.tolist() and got.exit.tolist() == want.exit.tolist()
        assert [p.exit for p in got] == want.exit.tolist()  # image by image, as Prediction
        cpu = next(line for line in service.metrics.render().splitlines() if line.startswith("dvt_model_cpu_seconds_total "))
        assert float(cpu.split()[1]) > 0
    finally:
        service.close()


# ---- the real service ----------------------------------------------------------------------------

def _write_pngs(folder: Path, images) -> list[Path]:
    paths = []
    for k, body in enumerate(loadtest.png_bodies(images)):
        p = folder / f"img{k:03d}.png"
        p.write_bytes(body)
        paths.append(p)
    return paths


def _conn(url, timeout=30):
    host, port = loadtest.check_loopback(url)
    return loadtest.Connection(host, port, timeout=timeout)


def _request(url, method, path, body=None, headers=None):
    conn = _conn(url)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _healthy(url) -> bool:
    status, _, body = _request(url, "GET", "/healthz")
    return status == 200 and json.loads(body)["status"] == "ok"


@pytest.fixture(scope="module")
def server():
    args = ["--model", "dvt_fashion_mnist", "--max-batch", "16", "--max-wait-ms", "5", "--max-body-mb", "1",
            "--read-timeout", "1.5", "--queue-limit", "512"]
    with loadtest.launch(args) as (url, proc):
        yield url, proc


@pytest.mark.serve
def test_answers_are_dvt_predicts_also_under_concurrency(server, tmp_path):
    url, _ = server
    paths = _write_pngs(tmp_path, SUBSET[:24])
    r = cli("predict", "--model", "dvt_fashion_mnist", "--json", *paths)
    assert r.returncode == 0, r.stderr
    want = {Path(d["path"]).name: d for d in map(json.loads, r.stdout.splitlines())}
    assert {d["exit"] for d in want.values()} >= {1, 2}

    def ask(p):
        status, headers, body = _request(url, "POST", "/v1/predict", p.read_bytes(), {"Content-Type": "image/png"})
        assert status == 200 and headers["content-type"].startswith("application/json"), body
        return p.name, json.loads(body)

    with ThreadPoolExecutor(8) as pool:
        got = dict(pool.map(ask, paths))
    for name, d in want.items():
        g = got[name]
        assert (g["label"], g["class_index"], g["exit"], g["macs"]) == (d["prediction"], d["class_index"],
                                                                        d["exit"], d["macs"]), name
        assert g["confidence"] == pytest.approx(d["confidence"], abs=1e-5)


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


@pytest.mark.serve
def test_bad_bodies_get_400_and_never_echo_the_input(server):
    url, _ = server
    png = loadtest.png_bodies(SUBSET[:1])[0]
    marker = b"<script>ECHO-ME-0x41</script>"
    bomb = _png_header(50_000, 50_000)  # 2.5 Gpx claimed in the header: refused before decoding
    for body in (b"", marker * 10, png[: len(png) // 2], b"\x89PNG\r\n\x1a\n" + marker, b"GIF89a" + marker, bomb):
        status, headers, data = _request(url, "POST", "/v1/predict", body, {"Content-Type": "text/plain"})
        assert status == 400, (body[:20], data)
        err = json.loads(data)["error"]
        assert err and "ECHO-ME" not in err and "script" not in err
    assert _request(url, "GET", "/v1/predict")[0] == 405
    assert _request(url, "GET", "/../../etc/passwd")[0] == 404
    assert _healthy(url)


@pytest.mark.serve
def test_oversized_bodies_get_413_from_the_header_and_while_streaming(server):
    url, _ = server
    host, port = loadtest.check_loopback(url)
    # Content-Length over 1 MiB: refused before any of the body is sent
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    # chunked, no length: refused once more than 1 MiB has arrived
    conn = _conn(url)
    try:
        conn.putrequest("POST", "/v1/predict")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        chunk = b"\0" * 65536
        try:
            for _ in range(40):  # 2.5 MiB at most
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass  # the server may close the connection once it has answered
        resp = conn.getresponse()
        assert resp.status == 413, resp.read()
    finally:
        conn.close()
    assert _healthy(url)


@pytest.mark.serve
def test_a_slow_client_gets_408_and_the_service_stays_healthy(server):
    url, _ = server
    host, port = loadtest.check_loopback(url)
    with socket.create_connection((host, port), timeout=15) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
        t0 = time.monotonic()
        assert _healthy(url)  # others are served meanwhile
        reply = s.recv(4096)
        waited = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
    assert waited < 10
    assert _healthy(url)


@pytest.mark.serve
def test_a_bounded_flood_is_served_and_metrics_count_it(server, model):
    url, _ = server
    before = _metric_values(_request(url, "GET", "/metrics")[2].decode())
    res = loadtest.run_load(url, loadtest.png_bodies(SUBSET[:50]) + [b"garbage"], concurrency=24, requests=306,
                            max_seconds=120)
    assert res["statuses"] == {"200": 300, "400": 6}, res
    status, headers, text = _request(url, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    after = _metric_values(text.decode())

    def grew(name):
        return after.get(name, 0) - before.get(name, 0)

    assert grew('dvt_requests_total{status="200"}') == 300 and grew('dvt_requests_total{status="400"}') == 6
    assert grew("dvt_request_latency_seconds_count") == 306
    assert sum(grew(f'dvt_exits_total{{exit="{k}"}}') for k in (1, 2, 3)) == 300 == grew("dvt_images_total")
    assert grew('dvt_exits_total{exit="1"}') > 0 and grew('dvt_exits_total{exit="2"}') > 0
    macs = model.exit_macs
    assert macs[0] <= after["dvt_macs_per_image"] <= macs[-1]
    runs1 = grew('dvt_stage_batch_size_count{stage="1"}')
    assert 0 < runs1 < 300 and grew('dvt_stage_batch_size_sum{stage="1"}') == 300  # batched, every image in stage 1
    assert after['dvt_queue_depth{stage="1"}'] == 0
    stored = model.checkpoint_meta["thresholds"]  # the default operating point, in force
    assert [after[f'dvt_threshold{{exit="{k}"}}'] for k in (1, 2)] == pytest.approx(stored[:2], abs=1e-6)
    assert _healthy(url)


def _metric_values(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.serve
def test_a_full_queue_answers_503_at_once_and_sigterm_finishes_in_flight_requests():
    bodies = loadtest.png_bodies(SUBSET[:12])
    args = ["--model", "dvt_fashion_mnist", "--max-batch", "64", "--max-wait-ms", "4000", "--queue-limit", "4"]
    with loadtest.launch(args) as (url, proc):
        results = []

        def ask(body):
            t0 = time.perf_counter()
            status, headers, data = _request(url, "POST", "/v1/predict", body)
            results.append((status, headers, json.loads(data), time.perf_counter() - t0))

        first = [threading.Thread(target=ask, args=(b,)) for b in bodies[:4]]
        for t in first:
            t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and 'dvt_queue_depth{stage="1"} 4' not in \
                _request(url, "GET", "/metrics")[2].decode():
            time.sleep(0.05)
        for b in bodies[4:]:  # the queue holds 4 images that wait 4 s for a fuller batch
            ask(b)
        refused = [r for r in results if r[0] == 503]
        assert len(refused) == 8
        assert all(r[1].get("retry-after") == "1" and r[3] < 1.0 and "error" in r[2] for r in refused)
        proc.send_signal(signal.SIGTERM)  # the 4 in flight are answered, then the process exits 0
        for t in first:
            t.join(30)
        assert proc.wait(30) == 0
    answered = [r for r in results if r[0] == 200]
    assert len(answered) == 4 and all(1 <= r[2]["exit"] <= 3 for r in answered)


@pytest.mark.serve
def test_cli_refuses_bad_options_in_one_line():
    for extra, needle in ((["--port", "70000"], "--port"), (["--max-batch", "0"], "--max-batch"),
                          (["--max-body-mb", "0"], "--max-body-mb"), (["--thresholds", "0.5"], "thresholds"),
                          (["--adapt-budget"], "--budget")):
        r = subprocess.run([sys.executable, "-m", "dvt_core", "serve", "--model", "dvt_fashion_mnist", *extra],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.serve
def test_dvt_benchmark_serve_reports_the_three_services(tmp_path, model):
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, "-m", "dvt_core", "benchmark", "dvt_fashion_mnist", "--serve", "--concurrency",
                        "2", "--requests", "24", "--repeats", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"adaptive", "every_stage", "static"}
    for rows in report["results"].values():
        assert [row["statuses"] for row in rows] == [{"200": 24}]
    static_macs = dvt_core.exit_macs(dvt_core.get_spec("static_fashion_mnist_7x7"))[-1]
    assert report["macs_per_image"]["static"] == static_macs
    assert report["macs_per_image"]["every_stage"] == model.exit_macs[-1]
    assert model.exit_macs[0] <= report["macs_per_image"]["adaptive"] < model.exit_macs[-1]
    assert report["mac_predicted_gain"] == pytest.approx(static_macs / report["macs_per_image"]["adaptive"])
    assert "MAC-predicted gain over static" in r.stdout


@pytest.mark.serve
@pytest.mark.export
def test_an_onnx_export_is_served_with_the_same_answers(tmp_path, model):
    from dvt_core.data.sources import normalize
    from dvt_core.runtime.contract import backend_of
    from dvt_core.runtime.operating_point import model_thresholds

    pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    folder = tmp_path / "onnx"
    r = cli("export", "dvt_fashion_mnist", "--weights", "default", "--format", "onnx", "--out", folder)
    assert r.returncode == 0, r.stderr[-2000:]
    images = SUBSET[:30]
    want = backend_of(model).adaptive_numpy(model, normalize(images, model.spec.mean, model.spec.std),
                                            model_thresholds(model))
    with loadtest.launch(["--backend", "onnx", "--weights", str(folder), "--max-wait-ms", "5"]) as (url, _):
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda b: json.loads(_request(url, "POST", "/v1/predict", b)[2]),
                                loadtest.png_bodies(images)))
    assert [g["class_index"] for g in got] == want.prediction.tolist()
    assert [g["exit"] for g in got] == (want.exit_index + 1).tolist()
