"""dvt serve speaks the Open Inference Protocol v2 (KServe v2 REST) to clients no one here wrote:
Triton's ``tritonclient.http`` and ``curl``, against one real server on 127.0.0.1 for the module.

Answers must equal ``dvt predict --json`` on the same image files, image for image, whether the images
come as pixels (JSON numbers or binary tensors), as normalised FP32 or as encoded files (BYTES), and
many per request; bad tensors and parameters get the protocol's ``{"error": ...}`` with a 4xx status.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dvt_core
from dvt_core.data.sources import normalize
from dvt_core.bench import loadtest

from helpers import cli

REPO = Path(__file__).resolve().parents[1]
SUBSET = np.load(REPO / "dvt_core" / "assets" / "fashion_mnist_test_subset.npz")["images"]
IMAGES = SUBSET[::7][:40]  # every class, easy and hard images
MODEL = "dvt_fashion_mnist"
MAX_IMAGES = 48
pytestmark = pytest.mark.serve
httpclient = pytest.importorskip("tritonclient.http", reason="needs the serve-test extra (tritonclient[http])")


@pytest.fixture(scope="module")
def server():
    args = ["--model", MODEL, "--max-batch", "16", "--max-wait-ms", "5", "--max-images", str(MAX_IMAGES),
            "--max-body-mb", "1", "--queue-limit", "256"]
    with loadtest.launch(args) as (url, proc):
        yield url


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """(the PNG files, dvt predict --json's answer for each, in order)."""
    folder = tmp_path_factory.mktemp("v2png")
    paths = []
    for k, body in enumerate(loadtest.png_bodies(IMAGES)):
        paths.append(folder / f"img{k:03d}.png")
        paths[-1].write_bytes(body)
    r = cli("predict", "--model", MODEL, "--json", *paths)
    assert r.returncode == 0, r.stderr
    want = [json.loads(line) for line in r.stdout.splitlines()]
    assert [Path(w["path"]).name for w in want] == [p.name for p in paths]
    assert {w["exit"] for w in want} == {1, 2, 3}  # every exit is taken somewhere in one request
    return paths, want


def _client(url):
    return httpclient.InferenceServerClient(url.split("//", 1)[1], network_timeout=60)


def _same_as_predict(result, want, rows=None):
    rows = range(len(want)) if rows is None else rows
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label").tolist()]
    assert labels == [want[r]["label"] for r in rows] == [want[r]["prediction"] for r in rows]
    assert result.as_numpy("class_index").tolist() == [want[r]["class_index"] for r in rows]
    assert result.as_numpy("exit").tolist() == [want[r]["exit"] for r in rows]
    assert result.as_numpy("macs").tolist() == [want[r]["macs"] for r in rows]
    np.testing.assert_allclose(result.as_numpy("confidence"), [want[r]["confidence"] for r in rows], atol=1e-5)


def test_tritonclient_pixels_binary_and_json_equal_dvt_predict(server, predicted):
    paths, want = predicted
    client = _client(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    meta = client.get_model_metadata(MODEL)
    model = dvt_core.build(MODEL, weights="default")
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 28, 28]}]
    assert meta["exit_macs"] == list(model.exit_macs) and len(meta["classes"]) == 10
    assert {"label", "class_index", "confidence", "exit", "macs"} <= {o["name"] for o in meta["outputs"]}
    for binary in (True, False):
        image = httpclient.InferInput("image", list(IMAGES.shape), "UINT8")
        image.set_data_from_numpy(IMAGES, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary)
                   for n in ("label", "class_index", "exit", "confidence", "macs", "exit_confidences")]
        result = client.infer(MODEL, [image], outputs=outputs, request_id="r1")
        _same_as_predict(result, want)
        reached = result.as_numpy("exit_confidences")
        assert reached.shape == (len(IMAGES), 3)
        for row, w in zip(reached, want):  # -1 where an image never ran, its confidences where it did
            np.testing.assert_allclose(row, [-1.0 if c is None else c for c in w["exit_confidences"]], atol=1e-5)
    assert result.get_response()["id"] == "r1"


def test_tritonclient_image_files_and_normalised_fp32_equal_dvt_predict(server, predicted):
    paths, want = predicted
    client = _client(server)
    files = httpclient.InferInput("image", [len(paths)], "BYTES")
    files.set_data_from_numpy(np.asarray([p.read_bytes() for p in paths], dtype=object), binary_data=True)
    _same_as_predict(client.infer(MODEL, [files]), want)  # no outputs named: the five, binary
    spec = dvt_core.get_spec(MODEL)
    x = normalize(IMAGES[:8], spec.mean, spec.std)
    fp32 = httpclient.InferInput("image", list(x.shape), "FP32")
    fp32.set_data_from_numpy(x, binary_data=True)
    _same_as_predict(client.infer(MODEL, [fp32], model_version="1"), want, range(8))


def test_per_request_thresholds_and_top_k_do_not_touch_other_requests(server, predicted):
    _, want = predicted
    client = httpclient.InferenceServerClient(server.split("//", 1)[1], concurrency=4, network_timeout=60)

    def ask(params):
        image = httpclient.InferInput("image", list(IMAGES.shape), "UINT8")
        image.set_data_from_numpy(IMAGES)
        outs = [httpclient.InferRequestedOutput(n) for n in ("exit", "class_index", "top_k_class_index")]
        return client.async_infer(MODEL, [image], outputs=outs, parameters=params)

    # four requests in flight at once, their images interleaved in the same stage batches
    pending = [ask(p) for p in [{"thresholds": [0.0, 0.0], "top_k": 3}, {"top_k": 2}] * 2]
    results = [p.get_result(timeout=60) for p in pending]
    for early, default in (results[0:2], results[2:4]):
        assert early.as_numpy("exit").tolist() == [1] * len(IMAGES)  # every confidence is >= 0
        assert default.as_numpy("exit").tolist() == [w["exit"] for w in want]
        assert early.as_numpy("top_k_class_index").shape == (len(IMAGES), 3)
        top = default.as_numpy("top_k_class_index")
        assert top.shape == (len(IMAGES), 2) and (top[:, 0] != top[:, 1]).all()
        assert top[:, 0].tolist() == [w["top_k"][0]["class_index"] for w in want]


def _post(url, path, body, headers=None):
    conn = loadtest.Connection(*loadtest.check_loopback(url), timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _infer_json(shape, datatype, data, **extra):
    return json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": datatype, "data": data}],
                       **extra}).encode()


@pytest.mark.parametrize("body,status,needle", [
    (_infer_json([2, 28, 28], "UINT8", [0] * 10), 400, "holds 10 numbers"),
    (_infer_json([2, 27, 27], "UINT8", [0] * (2 * 27 * 27)), 400, "[N, 28, 28]; got [2, 27, 27]"),
    (_infer_json([1, 28, 28], "INT16", [0] * 784), 400, "datatype"),
    (_infer_json([1, 28, 28], "UINT8", [300] * 784), 400, "0 to 255"),
    (_infer_json([1, 1, 28, 28], "FP32", ["x"] * 784), 400, "FP32 numbers"),
    (_infer_json([MAX_IMAGES + 1, 28, 28], "UINT8", [0]), 413, f"at most {MAX_IMAGES}"),
    (_infer_json([1], "BYTES", ["not base64!"]), 400, "base64"),
    (_infer_json([1], "BYTES", [base64.b64encode(b"not an image").decode()]), 400, "unreadable image"),
    (_infer_json([1, 28, 28], "UINT8", [0] * 784, parameters={"thresholds": [0.5, 7]}), 400, "'thresholds'"),
    (_infer_json([1, 28, 28], "UINT8", [0] * 784, parameters={"budget": 1}), 400, "'budget'"),
    (_infer_json([1, 28, 28], "UINT8", [0] * 784, parameters={"top_k": 11},
                 outputs=[{"name": "top_k_probability"}]), 400, "'top_k'"),
    (_infer_json([1, 28, 28], "UINT8", [0] * 784, outputs=[{"name": "logits\x1b[31m"}]), 400, "unknown output"),
    (_infer_json([True, 28, 28], "UINT8", [0] * 784), 400, "the input's shape"),
    (_infer_json([0, 28, 28], "UINT8", [], parameters={"thresholds": [0.5]}), 400, "'thresholds'"),
    (b"{not json", 400, "not valid JSON"),
])
def test_bad_requests_get_the_protocols_error(server, body, status, needle):
    got, raw = _post(server, f"/v2/models/{MODEL}/infer", body)
    assert got == status and needle in json.loads(raw)["error"], raw
    assert b"\x1b" not in raw


def test_unknown_models_versions_methods_and_binary_headers(server):
    ok = _infer_json([1, 28, 28], "UINT8", [0] * 784)
    assert _post(server, "/v2/models/resnet50/infer", ok)[0] == 404
    assert _post(server, f"/v2/models/{MODEL}/versions/2/infer", ok)[0] == 404
    assert _post(server, f"/v2/models/{MODEL}/versions/1/infer", ok)[0] == 200
    bad_len = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(ok) + 5)}
    status, raw = _post(server, f"/v2/models/{MODEL}/infer", ok, bad_len)
    assert status == 400 and "Inference-Header-Content-Length" in json.loads(raw)["error"]
    head = json.dumps({"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8",
                                   "parameters": {"binary_data_size": 784}}]}).encode()
    short = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    status, raw = _post(server, f"/v2/models/{MODEL}/infer", head + bytes(700), short)
    assert status == 400 and "binary_data_size" in json.loads(raw)["error"]
    r = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", f"{server}/v1/predict"], capture_output=True,
                       text=True, timeout=30)
    body, code = r.stdout.rsplit("\n", 1)
    assert code == "405" and "POST /v1/predict" in json.loads(body)["error"]


def test_curl_json_and_multipart_equal_dvt_predict(server, predicted, tmp_path):
    paths, want = predicted
    request = tmp_path / "infer.json"
    request.write_bytes(_infer_json(list(IMAGES[:6].shape), "UINT8", IMAGES[:6].reshape(-1).tolist(),
                                    id="curl-1"))
    r = subprocess.run(["curl", "-sf", "-H", "Content-Type: application/json", "--data-binary", f"@{request}",
                        f"{server}/v2/models/{MODEL}/infer"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    out = {o["name"]: o for o in doc["outputs"]}
    assert doc["id"] == "curl-1" and doc["model_name"] == MODEL
    assert out["label"]["data"] == [w["label"] for w in want[:6]] and out["label"]["shape"] == [6]
    assert out["exit"]["data"] == [w["exit"] for w in want[:6]]
    assert out["macs"]["data"] == [w["macs"] for w in want[:6]]
    for p, w in list(zip(paths, want))[:4]:
        r = subprocess.run(["curl", "-sf", "-F", f"file=@{p}", f"{server}/v1/predict"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        for key in ("prediction", "label", "class_index", "exit", "macs"):
            assert got[key] == w[key], key
    r = subprocess.run(["curl", "-s", "-F", f"a=@{paths[0]}", "-F", f"b=@{paths[1]}", f"{server}/v1/predict"],
                       capture_output=True, text=True, timeout=60)
    assert "exactly one file" in json.loads(r.stdout)["error"]
    live = subprocess.run(["curl", "-sf", f"{server}/v2/health/live"], capture_output=True, text=True, timeout=30)
    assert json.loads(live.stdout) == {"live": True}


def test_benchmark_serve_says_how_to_install_hey_when_it_is_missing(tmp_path):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "dvt_core", "benchmark", "dvt_fashion_mnist", "--serve"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "apt-get install hey" in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr
