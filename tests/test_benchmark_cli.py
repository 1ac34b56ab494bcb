"""``dvt benchmark``: a tiny model end to end (figures are not asserted: timing is not tested), and
its refusals (status 2, one line)."""
from __future__ import annotations

import json

import pytest

from helpers import dvt

TINY = ["-O", "img_size=32", "-O", "grids=[2,3,4]", "-O", "depth=1", "-O", "embed_dim=32", "-O", "num_heads=2"]


def test_benchmark_prints_every_variant_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = dvt("benchmark", "dvt_deit_tiny", *TINY, "--batch-sizes", "1", "4", "--images", "8", "--repeats", "1",
            "--warmup", "0", "--split", "0.5", "0.25", "0.25", "--json", out, "--no-timm")
    assert r.returncode == 0, r.stderr
    for word in ("adaptive", "all exits", "static", "predicted", "realised", "batch 1:", "batch 4:"):
        assert word in r.stdout
    report = json.loads(out.read_text())
    assert [b["batch"] for b in report["batches"]] == [1, 4]
    for b in report["batches"]:
        assert b["images"] == 8 and abs(sum(b["exit_shares"]) - 1) < 1e-9
        assert b["exit_shares"] == [0.5, 0.25, 0.25]
        v = b["variants"]
        assert set(v) == {"adaptive", "all exits", "static"}
        assert v["all exits"]["macs_per_image"] == report["exit_macs"][-1]
        assert v["all exits"]["predicted_speedup"] == pytest.approx(report["exit_macs"][-1] / b["mean_macs"])
        assert v["static"]["realised_speedup"] > 0
    # no overwrite without --force
    r = dvt("benchmark", "dvt_deit_tiny", *TINY, "--batch-sizes", "1", "--images", "1", "--json", out, "--no-timm")
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("extra,message", [
    (["--split", "0.5", "0.5"], "--split needs 3"),
    (["--budget", "1"], "--budget 1 MACs is outside"),
    (["--batch-sizes", "0"], "--batch-sizes must be 1 or more"),
    (["--device", "nonsense"], "device 'nonsense'"),
])
def test_benchmark_refuses_bad_options(extra, message):
    r = dvt("benchmark", "dvt_deit_tiny", *TINY, "--no-timm", *extra)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.export
def test_benchmark_onnx_times_both_runtimes_on_the_same_exits(tmp_path):
    out = tmp_path / "bench.json"
    r = dvt("benchmark", "dvt_deit_tiny", *TINY, "--backend", "onnx", "--batch-sizes", "2", "--images", "8",
            "--repeats", "1", "--warmup", "0", "--threads", "1", "--split", "0.5", "0.25", "0.25", "--json", out)
    assert r.returncode == 0, r.stderr
    for words in ("torch eager adaptive", "ONNX Runtime adaptive", "ONNX Runtime speed-up over torch eager",
                  "onnxruntime", "1 intra-op threads", "same exits in both runtimes: yes"):
        assert words in r.stdout
    report = json.loads(out.read_text())
    assert report["backend"] == "onnx" and report["machine"]["onnxruntime_threads"] == 1
    (b,) = report["batches"]
    assert b["batch"] == 2 and b["images"] == 8 and b["same_exits"] is True
    assert b["exit_shares"] == [0.5, 0.25, 0.25]  # the tie margin moved no image to another exit
    v = b["variants"]
    assert set(v) == {"torch eager adaptive", "ONNX Runtime adaptive"}
    assert b["onnx_speedup_best"] == pytest.approx(v["torch eager adaptive"]["ms_per_image_best"]
                                                   / v["ONNX Runtime adaptive"]["ms_per_image_best"])
    assert f"{b['onnx_speedup_best']:.2f}x best" in r.stdout


def test_tie_safe_thresholds_keep_the_exits_and_leave_room():
    import numpy as np

    from dvt_core.runtime import policy
    from dvt_core.runtime.benchmarking import EXIT_TIE_MARGIN, tie_safe_thresholds

    # exit 1: confidences 0.9, 0.5, 0.4999990 (a gap of 1e-6 under the threshold), 0.2; exit 2 takes one more
    conf = np.array([[0.9, 0.5, 0.499999, 0.2], [0.3, 0.3, 0.8, 0.6], [0.5, 0.5, 0.5, 0.5]])
    probs = (np.stack([conf, 1 - conf], -1) / np.array([1.0, 1e9])).astype(np.float32)  # max softmax = conf
    t = policy.find_thresholds(probs, np.array([0.5, 0.25, 0.25], np.float32))
    safe = tie_safe_thresholds(probs, t)
    assert t[0] == np.float32(0.5) and t[1] == np.float32(0.8)
    assert 0.499999 < safe[0] < t[0] and t[0] - safe[0] < 1e-6  # half the gap, not the full margin
    assert t[1] - safe[1] == pytest.approx(EXIT_TIE_MARGIN, rel=1e-2)  # 0.6 is far below: the full margin
    assert safe[2] == t[2]
    np.testing.assert_array_equal(policy.assign_exits(probs, safe), policy.assign_exits(probs, t))


@pytest.mark.parametrize("extra,message", [
    (["--backend", "mindspore"], "dvt benchmark times --backend torch or onnx, not 'mindspore'"),
    (["--backend", "onnx", "--amp", "bf16"], "--amp is for --backend torch"),
    (["--backend", "onnx", "--device", "cuda"], "device 'cuda'"),
])
def test_benchmark_backend_refusals(extra, message):
    r = dvt("benchmark", "dvt_deit_tiny", *TINY, *extra)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
