"""``dvt benchmark``: a tiny model end to end (figures are not asserted: timing is not tested), and
its refusals (status 2, one line)."""
from __future__ import annotations

import json

import pytest

from test_cli import dvt

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
