"""dvt_core.integrations.ray on a local Ray instance (num_cpus=2, a small object store, shut down after).

Ray Data: 2,000 Fashion-MNIST test images through DVTPredictor actors give exactly the library's
adaptive answers on the same images (what ``dvt predict`` computes from their files). Ray Serve: the
per-stage scheduler deployed as two replicas answers on one loopback endpoint like ``dvt serve``.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest

import dvt_core

SUBSET = Path(__file__).resolve().parents[1] / "dvt_core" / "assets" / "fashion_mnist_test_subset.npz"


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'dvt[ray]'")  # a failure in CI
    ray.init(num_cpus=2, object_store_memory=100 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _temp_dir=str(tmp_path_factory.mktemp("ray")), ignore_reinit_error=False)
    try:
        yield ray
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def model():
    return dvt_core.build("dvt_fashion_mnist", weights="default")


@pytest.mark.ray
@pytest.mark.dataset
def test_ray_data_gives_the_librarys_adaptive_answers_on_2000_test_images(local_ray, model):
    from dvt_core.data.datasets import model_classes
    from dvt_core.data.sources import load_fashion_mnist
    from dvt_core.integrations.ray import DVTPredictor
    from dvt_core.runtime import evaluation

    try:
        images, targets = load_fashion_mnist("test")
    except dvt_core.DVTError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {exc}")
    images, targets = images[:2000], targets[:2000]
    want = evaluation.adaptive(model, images, streaming=False)  # per-batch early exit, no Ray
    assert want.exit_counts.min() > 0  # every exit is taken
    ds = local_ray.data.from_items([{"index": k, "target": int(t), "image": img}
                                    for k, (img, t) in enumerate(zip(images, targets))])
    out = ds.map_batches(DVTPredictor, fn_constructor_kwargs={"model": "dvt_fashion_mnist"}, batch_size=250,
                         concurrency=2, num_cpus=1).to_pandas()
    assert len(out) == 2000 and "image" not in out.columns
    out = out.sort_values("index")
    assert out["index"].tolist() == list(range(2000))
    assert out["class_index"].tolist() == want.prediction.tolist()
    assert out["exit"].tolist() == (want.exit_index + 1).tolist()
    assert out["macs"].tolist() == want.macs.tolist()
    np.testing.assert_allclose(out["confidence"].to_numpy(), want.confidence, rtol=1e-5, atol=1e-6)
    classes = model_classes(model.checkpoint_meta, 10)
    assert out["label"].tolist() == [classes[k] for k in want.prediction]
    assert (out["class_index"].to_numpy() == out["target"].to_numpy()).mean() > 0.8  # a trained model


@pytest.mark.ray
def test_the_predictor_resizes_other_images_and_refuses_non_uint8(model):
    from dvt_core.integrations.ray import DVTPredictor

    pred = DVTPredictor("dvt_fashion_mnist")
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
    out = pred({"image": big})
    want = dvt_core.build("dvt_fashion_mnist", weights="default")
    from dvt_core.data.images import preprocess
    from dvt_core.runtime.contract import backend_of

    ref = backend_of(want).adaptive_numpy(want, preprocess(big, want.spec), pred.thresholds)
    assert out["class_index"].tolist() == ref.prediction.tolist() and out["exit"].tolist() == (ref.exit_index + 1
                                                                                              ).tolist()
    with pytest.raises(dvt_core.InputError, match="uint8"):
        pred({"image": big.astype(np.float32)})
    with pytest.raises(dvt_core.InputError, match="no 'image' column"):
        pred({"pixels": big})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_ray_serve_replicas_answer_like_dvt_serve(local_ray, model):
    from ray import serve

    from dvt_core.integrations.ray import serve_deployment
    from dvt_core.runtime.contract import backend_of
    from dvt_core.data.sources import normalize
    from dvt_core.runtime.operating_point import model_thresholds
    from dvt_core.bench import loadtest

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = serve_deployment("dvt_fashion_mnist", num_replicas=2, ray_actor_options={"num_cpus": 0.5},
                           limits={"max_batch": 8, "max_wait_ms": 5})
    serve.run(app, name="dvt", route_prefix="/dvt", blocking=False)
    url = f"http://127.0.0.1:{port}"
    images = np.load(SUBSET)["images"][:40]
    bodies = loadtest.png_bodies(images)
    deadline = time.monotonic() + 120
    while True:  # the proxy answers once both replicas are up
        try:
            conn = loadtest.Connection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/dvt/healthz")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "Ray Serve did not come up within 120 s"
        time.sleep(1)
    load = loadtest.run_load(url + "/dvt", bodies, concurrency=4, requests=40, max_seconds=120)
    assert load["statuses"] == {"200": 40}, load  # concurrent requests, spread over the replicas
    want = backend_of(model).adaptive_numpy(model, normalize(images, model.spec.mean, model.spec.std),
                                            model_thresholds(model))
    conn = loadtest.Connection("127.0.0.1", port, timeout=60)
    got = []
    for body in bodies:
        status, data = loadtest.post(conn, body, "/dvt/v1/predict")
        assert status == 200, data
        got.append(json.loads(data))
    assert [g["class_index"] for g in got] == want.prediction.tolist()
    assert [g["exit"] for g in got] == (want.exit_index + 1).tolist()
    status, data = loadtest.post(conn, b"not an image", "/dvt/v1/predict")
    assert status == 400 and "error" in json.loads(data)
    # the Open Inference Protocol v2 through the same handler: 40 images in one request
    request = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape),
                                      "data": images.reshape(-1).tolist()}]}).encode()
    status, data = loadtest.post(conn, request, "/dvt/v2/models/dvt_fashion_mnist/infer")
    assert status == 200, data
    outputs = {o["name"]: o["data"] for o in json.loads(data)["outputs"]}
    assert outputs["class_index"] == want.prediction.tolist() and outputs["exit"] == want.exit.tolist()
    conn.request("GET", "/dvt/healthz")
    assert json.loads(conn.getresponse().read()) == {"status": "ok", "model": "dvt_fashion_mnist"}
    time.sleep(2.5)  # each replica reports its counters every second
    seen = []
    for _ in range(4):  # whichever replica answers, the counters are the deployment's and never drop
        conn.request("GET", "/dvt/metrics")
        text = conn.getresponse().read().decode()
        seen.append(int(next(line.split()[1] for line in text.splitlines() if line.startswith("dvt_images_total "))))
    assert seen == sorted(seen) and seen[0] >= 40 + 40 + 40, seen
    serve.delete("dvt")
