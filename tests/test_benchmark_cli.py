"""``dvt benchmark``: a tiny model end to end (figures are not asserted: timing is not tested), and
its refusals (status 2, one line)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

import dvt_core
from helpers import dvt

TINY = ["-O", "img_size=32", "-O", "grids=[2,3,4]", "-O", "depth=1", "-O", "embed_dim=32", "-O", "num_heads=2"]
SPEC = dvt_core.get_spec("dvt_deit_tiny", img_size=32, grids=[2, 3, 4], depth=1, embed_dim=32, num_heads=2)


def test_benchmark_prints_every_variant_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = dvt("benchmark", "dvt_deit_tiny", *TINY, "--batch-sizes", "1", "4", "--images", "8", "--repeats", "1",
            "--warmup", "0", "--split", "0.5", "0.25", "0.25", "--json", out, "--no-timm",
            "--modes", "adaptive", "stages", "streaming", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "1 thread," in r.stdout and "1 threads" not in r.stdout  # text, not Python's list repr
    # the figures say which CPU they come from and whether it has AMX, as /proc/cpuinfo says
    flags = next((ln for ln in open("/proc/cpuinfo", encoding="utf-8") if ln.startswith("flags")), "")
    amx = "amx_tile" in flags.split()
    first = r.stdout.splitlines()[0]
    assert first.startswith("machine: ") and (", with AMX," in first) == amx and (", without AMX," in first) != amx, first
    assert "exit MACs " in r.stdout and "exit MACs [" not in r.stdout and " / " in r.stdout.split("exit MACs ")[1]
    for word in ("adaptive", "all exits", "static", "predicted", "realised", "torch fp32, batch 1:",
                 "torch fp32, batch 4:", "each stage alone", "GMAC/s", "streaming", "same exits as per-batch: yes"):
        assert word in r.stdout
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["runtime"] == "torch" and run["precision"] == "fp32"
    assert run["exit_macs"] == dvt_core.exit_macs(SPEC)
    assert [b["batch"] for b in run["batches"]] == [1, 4]
    for b in run["batches"]:
        a = b["adaptive"]
        assert a["images"] == 8 and a["exit_shares"] == [0.5, 0.25, 0.25]
        v = a["variants"]
        assert set(v) == {"adaptive", "all exits", "static"}
        assert v["all exits"]["macs_per_image"] == run["exit_macs"][-1]
        assert v["all exits"]["predicted_speedup"] == pytest.approx(run["exit_macs"][-1] / a["mean_macs"])
        assert v["static"]["realised_speedup"] > 0
        # the mean MACs follow the exits taken: half the images pay exit 1, a quarter exit 2, a quarter exit 3
        assert a["mean_macs"] == pytest.approx(float(np.dot([0.5, 0.25, 0.25], run["exit_macs"])))
        stages = b["stages"]["variants"]
        assert [stages[f"stage {k + 1}"]["macs_per_image"] for k in range(3)] == \
            [dvt_core.stage_macs(SPEC, k) for k in range(3)]
        assert stages["static"]["of_static"] == pytest.approx(1.0)
        # each stage is also timed inside the whole cascade, beside its time alone; the static model is not
        assert "ms_per_image_in_cascade" not in stages["static"]
        for k in range(3):
            st = stages[f"stage {k + 1}"]
            assert st["ms_per_image_in_cascade"] > 0
            assert st["in_cascade_of_alone"] == pytest.approx(st["ms_per_image_in_cascade"] / st["ms_per_image_best"])
        assert b["streaming"]["same_exits"] is True
    # one verdict per batch size, the last line of the output
    assert len(report["verdicts"]) == 2 and r.stdout.strip().splitlines()[-1] == report["verdicts"][-1]
    assert re.fullmatch(r"early exit (pays|is faster but short of the MACs|does not pay): \d+\.\d\dx (faster|slower) "
                        r"than static at torch fp32, batch 4 \(MACs predict \d+\.\d\dx; ratio \d+\.\d\d\)",
                        report["verdicts"][-1]), report["verdicts"][-1]
    # no overwrite without --force
    r = dvt("benchmark", "dvt_deit_tiny", *TINY, "--batch-sizes", "1", "--images", "1", "--json", out, "--no-timm")
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr


def test_benchmark_uses_the_checkpoint_operating_point_and_units_that_fit(tmp_path):
    out = tmp_path / "bench.json"
    r = dvt("benchmark", "dvt_fashion_mnist", "--weights", "default", "--batch-sizes", "2", "--images", "8",
            "--repeats", "1", "--warmup", "0", "--modes", "adaptive", "--precision", "fp32", "bf16", "--json", out)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    meta_thresholds = dvt_core.build("dvt_fashion_mnist", weights="default").checkpoint_meta["thresholds"]
    assert [run["precision"] for run in report["runs"]] == ["fp32", "bf16"]
    for run in report["runs"]:
        assert "the default stored in the checkpoint" in run["operating_point"]
        (b,) = run["batches"]
        assert b["thresholds"][:2] == pytest.approx(meta_thresholds[:2])
    assert "static 11.8 M" in r.stdout and "MMACs/image" in r.stdout  # the shipped model counts in M
    assert "torch bf16, batch 2" in r.stdout


def test_benchmark_budget_takes_suffixes():
    r = dvt("benchmark", "dvt_deit_tiny", *TINY, "--no-timm", "--budget", "0.4M", "--batch-sizes", "2",
            "--images", "4", "--repeats", "1", "--warmup", "0", "--modes", "adaptive")
    assert r.returncode == 0, r.stderr
    assert "--budget 0.40M MACs" in r.stdout


@pytest.mark.parametrize("extra,message", [
    (["--split", "0.5", "0.5"], "--split needs 3"),
    (["--budget", "1"], "--budget 1 MACs is outside"),
    (["--batch-sizes", "0"], "--batch-sizes: must lie in [1, "),
    (["--device", "nonsense"], "device 'nonsense'"),
])
def test_benchmark_refuses_bad_options(extra, message):
    r = dvt("benchmark", "dvt_deit_tiny", *TINY, "--no-timm", *extra)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.export
def test_benchmark_onnx_times_adaptive_against_its_own_static_export(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bench.json"
    r = dvt("benchmark", "dvt_deit_tiny", *TINY, "--backend", "torch", "onnx", "--batch-sizes", "2", "--images", "8",
            "--repeats", "1", "--warmup", "0", "--threads", "1", "--split", "0.5", "0.25", "0.25", "--json", out,
            "--no-timm", "--modes", "adaptive", "stages")
    assert r.returncode == 0, r.stderr
    for words in ("== torch fp32", "== onnx fp32", "onnx fp32, batch 2:", "1 thread,"):
        assert words in r.stdout
    report = json.loads(out.read_text())
    torch_run, onnx_run = report["runs"]
    assert onnx_run["runtime"] == "onnx" and onnx_run["exit_macs"] == torch_run["exit_macs"]
    assert onnx_run["static_macs"] == torch_run["static_macs"]
    (b,) = onnx_run["batches"]
    assert b["adaptive"]["exit_shares"] == [0.5, 0.25, 0.25]  # the tie margin moved no image to another exit
    assert set(b["adaptive"]["variants"]) == {"adaptive", "all exits", "static"}
    assert set(b["stages"]["variants"]) == {"stage 1", "stage 2", "stage 3", "static"}
    assert len(report["verdicts"]) == 2 and "onnx fp32, batch 2" in report["verdicts"][-1]


@pytest.mark.export
def test_benchmark_takes_an_export_folder_and_finds_the_static_export_beside_it(tmp_path):
    pytest.importorskip("onnxruntime")
    from dvt_core.export.writer import export_model
    from dvt_core.model.zoo import static_spec

    dvt_export = export_model(dvt_core.build(SPEC), "onnx", tmp_path / "dvt")
    export_model(dvt_core.build(static_spec(SPEC, 2)), "onnx", tmp_path / "static")
    r = dvt("benchmark", "dvt_deit_tiny", *TINY, "--backend", "onnx", "--weights", dvt_export, "--batch-sizes", "2",
            "--images", "4", "--repeats", "1", "--warmup", "0", "--split", "0.5", "0.25", "0.25", "--modes", "adaptive")
    assert r.returncode == 0, r.stderr
    assert "== onnx fp32" in r.stdout and "early exit" in r.stdout.strip().splitlines()[-1]


def test_tie_safe_thresholds_keep_the_exits_and_leave_room():
    import numpy as np

    from dvt_core.runtime import policy
    from dvt_core.bench.benchmarking import EXIT_TIE_MARGIN, tie_safe_thresholds

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
    (["--backend", "mindspore"], "dvt benchmark times torch, onnx, openvino, pt2, not 'mindspore'"),
    (["--backend", "onnx", "--compile"], "--compile is for the torch runtime alone"),
    (["--backend", "onnx", "--device", "cuda"], "device 'cuda'"),
    (["--budget", "lots"], "'lots' is not a number of MACs"),
    (["--weights", "no-such-file"], "weights file or folder not found: no-such-file"),
])
def test_benchmark_backend_refusals(extra, message):
    r = dvt("benchmark", "dvt_deit_tiny", *TINY, *extra)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.export
def test_benchmark_leaves_out_a_precision_a_runtime_lacks_and_refuses_when_nothing_is_left(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bench.json"
    r = dvt("benchmark", "dvt_deit_tiny", *TINY, "--no-timm", "--backend", "torch", "onnx", "--precision", "bf16",
            "--batch-sizes", "2", "--images", "2", "--repeats", "1", "--warmup", "0", "--modes", "adaptive",
            "--json", out)
    assert r.returncode == 0, r.stderr
    assert "note: the onnx runtime runs fp32, not bf16 (its CPU provider has no bf16 kernels" in r.stdout
    assert "): left out" in r.stdout
    report = json.loads(out.read_text())
    assert [(run["runtime"], run["precision"]) for run in report["runs"]] == [("torch", "bf16")]
    r = dvt("benchmark", "dvt_deit_tiny", *TINY, "--backend", "onnx", "--precision", "bf16")
    assert r.returncode == 2 and "the onnx runtime runs fp32, not bf16" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
