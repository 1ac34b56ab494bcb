"""The measured cost model: ``dvt profile`` stores each stage's time inside the cascade (``cost_profile``), a
time budget picks the most accurate operating point expected to meet it, a tampered or out-of-range profile is
refused by name, and the --out / --force rules hold. Timings here are tiny (a few images, one round): the tests
check what is stored and chosen, never how fast anything is."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers import SHIPPED, dvt, needs_fashion, ok, user_error

STAGE_MS = [1.0, 2.0, 4.0]  # a profile made up for the choice tests: exits cost 1.5, 3.5 and 7.5 ms with the call
OVERHEAD_MS = 0.5


def _profile(batches=((1, STAGE_MS, 6.0), (64, [0.1, 0.4, 1.6], 0.3)), **changes) -> dict:
    rows = [{"batch": b, "images": 64, "stage_ms": list(ms), "overhead_ms": OVERHEAD_MS if b == 1 else 0.02,
             "static_ms": static} for b, ms, static in batches]
    return {"version": 1, "runtime": "torch", "precision": "fp32", "threads": 1,
            "machine": {"cpu": "test CPU", "amx": False, "cores": 2, "versions": {"dvt": "0"}}, "batches": rows,
            **changes}


def _with_profile(tmp_path, name: str, profile) -> str:
    """A copy of the shipped weights with ``profile`` stored (written as the library writes checkpoints)."""
    from dvt_core.checkpoint.files import read_checkpoint, write_checkpoint

    ckpt = read_checkpoint(SHIPPED)
    spec = ckpt.meta["spec"]
    state = ckpt.canonical_state(len(spec["stages"]), spec["in_chans"])
    dst = tmp_path / name
    write_checkpoint(dst, state, {**ckpt.meta, "cost_profile": profile}, fmt="safetensors")
    return str(dst)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """``dvt profile`` of the shipped model at batch sizes 1 and 4 on 4 images, one round, in a copy."""
    tmp = tmp_path_factory.mktemp("profile")
    r = ok(dvt("profile", "--weights", "default", "--model", "dvt_fashion_mnist", "--out", "p.safetensors",
               "--images", "4", "--batch-sizes", "1", "4", "--repeats", "1", "--warmup", "0", "--json", "p.json",
               cwd=tmp))
    return tmp, r


# ---- the library: parsing, the choice, the verdict ------------------------------------------------------------

def test_parse_latency_units():
    from dvt_core.errors import InputError
    from dvt_core.runtime.cost_model import parse_latency

    assert parse_latency("0.4ms") == pytest.approx(4e-4)
    assert parse_latency("400us") == pytest.approx(4e-4)
    assert parse_latency("0.0004s") == pytest.approx(4e-4)
    assert parse_latency("2") == pytest.approx(2e-3)  # a bare number is ms
    for bad in ("fast", "-1ms", "0ms", "1 hour", "nan"):
        with pytest.raises(InputError):
            parse_latency(bad)


@pytest.fixture(scope="module")
def held_out():
    """Synthetic held-out probabilities of a three-exit model whose later exits are more accurate."""
    rng = np.random.default_rng(0)
    n, classes = 400, 10
    labels = rng.integers(0, classes, n)
    probs = []
    for sharp in (1.0, 2.0, 3.5):
        logits = rng.standard_normal((n, classes))
        logits[np.arange(n), labels] += sharp
        z = np.exp(logits - logits.max(1, keepdims=True))
        probs.append(z / z.sum(1, keepdims=True))
    return np.float32(probs), labels


def test_latency_budget_picks_the_most_accurate_point_that_meets_it(held_out):
    from dvt_core.model.zoo import get_spec
    from dvt_core.runtime import operating_point, policy
    from dvt_core.runtime.cost_model import exit_seconds, expected_seconds

    probs, labels = held_out
    spec = get_spec("dvt_fashion_mnist")
    row = _profile()["batches"][0]
    assert exit_seconds(row) * 1e3 == pytest.approx([1.5, 3.5, 7.5])

    def seconds(shares):
        return expected_seconds(row, shares)

    rows = operating_point.budgets_table(probs, labels, operating_point.exit_costs(spec))
    meta = {"budgets": rows, "holdout_anytime_accuracy": policy.anytime_accuracy(probs, labels).tolist()}

    def ms_of(thresholds):  # the time of an operating point, from the exits its thresholds send images to
        shares = np.bincount(policy.assign_exits(probs, thresholds), minlength=3) / len(labels)
        return float(OVERHEAD_MS + shares @ np.cumsum(STAGE_MS))

    times = [ms_of(r["thresholds"]) for r in rows]
    for budget_ms in (1.6, 2.5, 3.0, 4.2, 6.0):
        op = operating_point.latency_operating_point(meta, budget_ms * 1e-3, spec, seconds)
        assert ms_of(op["thresholds"]) <= budget_ms + 1e-9
        assert op["expected_seconds"] * 1e3 == pytest.approx(ms_of(op["thresholds"]))
        fitting = [r["holdout_accuracy"] for r, t in zip(rows, times) if t <= budget_ms]
        assert op["expected_accuracy"] >= max(fitting, default=-1.0)
    assert ms_of(operating_point.latency_operating_point(meta, 2.5e-3, spec, seconds)["thresholds"]) < \
        ms_of(operating_point.latency_operating_point(meta, 6e-3, spec, seconds)["thresholds"])


def test_latency_budget_below_every_point_and_missing_shares_are_refused(held_out):
    from dvt_core.errors import InputError
    from dvt_core.model.zoo import get_spec
    from dvt_core.runtime import operating_point
    from dvt_core.runtime.cost_model import expected_seconds

    probs, labels = held_out
    spec = get_spec("dvt_fashion_mnist")

    def seconds(shares):
        return expected_seconds(_profile()["batches"][0], shares)

    rows = operating_point.budgets_table(probs, labels, operating_point.exit_costs(spec))
    with pytest.raises(InputError, match="1.5 ms"):
        operating_point.latency_operating_point({"budgets": rows}, 1.2e-3, spec, seconds)
    stripped = [{k: v for k, v in r.items() if k != "holdout_exit_shares"} for r in rows]
    with pytest.raises(InputError, match="exit shares"):
        operating_point.latency_operating_point({"budgets": stripped}, 5e-3, spec, seconds)


def test_expected_time_charges_a_stage_fixed_cost_per_batch_that_reaches_it():
    from dvt_core.runtime.cost_model import expected_seconds

    row = {"batch": 4, "stage_ms": [1.0, 2.0, 4.0], "stage_call_ms": [0.0, 4.0, 8.0], "overhead_ms": 0.25}
    # reaching 1 / 0.5 / 0: stage 1 costs 1; stage 2 costs 0.5 * (2 - 4 / 4) per image plus 4 ms for each batch
    # any image reaches, (1 - 0.5 ** 4) of them, a quarter of a call per image; stage 3 nothing
    assert expected_seconds(row, [0.5, 0.5, 0.0]) * 1e3 == pytest.approx(0.25 + 1.0 + 0.5 + (1 - 0.5 ** 4) / 4 * 4)
    # every image through every stage: exactly the measured times
    assert expected_seconds(row, [0.0, 0.0, 1.0]) * 1e3 == pytest.approx(0.25 + 7.0)
    assert expected_seconds(dict(row, batch=1, stage_call_ms=None), [0.5, 0.5, 0.0]) * 1e3 == \
        pytest.approx(0.25 + 1.0 + 0.5 * 2.0)


def test_expected_time_mixes_hot_and_all_through_stage_times_at_batch_1():
    from dvt_core.runtime.cost_model import exit_seconds, expected_seconds

    row = {"batch": 1, "stage_ms": [1.0, 2.0, 4.0], "stage_hot_ms": [0.5, 1.5, 4.0], "overhead_ms": 0.25}
    # exits 60 / 30 / 10 %: at batch 1 a stage is hot with the chance that the image before left at its exit,
    # stage 1: 0.6 * 0.5 + 0.4 * 1 = 0.7; stage 2 (reached by 0.4): 0.3 * 1.5 + 0.7 * 2 = 1.85; stage 3: 4
    assert expected_seconds(row, [0.6, 0.3, 0.1]) * 1e3 == pytest.approx(0.25 + 0.7 + 0.4 * 1.85 + 0.1 * 4.0)
    # without hot times (a profile measured before them) the all-through result: 0.25 + 1 + 0.4 * 2 + 0.1 * 4
    old = {k: v for k, v in row.items() if k != "stage_hot_ms"}
    assert expected_seconds(old, [0.6, 0.3, 0.1]) * 1e3 == pytest.approx(2.45)
    # every image leaving at exit k: the stages before it all-through, its own hot
    assert exit_seconds(row) * 1e3 == pytest.approx([0.75, 2.75, 7.25])
    for k in range(3):
        assert expected_seconds(row, np.eye(3)[k]) == pytest.approx(exit_seconds(row)[k])


def test_expected_time_at_a_larger_batch_is_hot_only_when_the_whole_batch_before_was():
    from dvt_core.runtime.cost_model import expected_seconds, hot_chances

    # F = 0.5 / 1 / 1: the batch of 4 before left all at exit 1 with chance 0.5 ** 4, else went to stage 2
    assert hot_chances([0.5, 0.5, 0.0], 4) == pytest.approx([0.0625, 0.9375, 0.0])
    assert hot_chances([0.68, 0.27, 0.05], 64)[0] < 1e-9  # at batch 64 stage 1 is practically never hot
    assert hot_chances([0.68, 0.27, 0.05], 1) == pytest.approx([0.68, 0.27, 0.05])
    row = {"batch": 4, "stage_ms": [1.0, 2.0, 4.0], "stage_hot_ms": [0.5, 1.0, 4.0], "stage_call_ms": [0.0, 4.0, 8.0],
           "overhead_ms": 0.25}
    # stage 1: 0.0625 * 0.5 + 0.9375 * 1 = 0.96875; stage 2 per image 0.9375 * 1 + 0.0625 * 2 = 1.0625, less
    # its fixed 4 / 4, for the half reaching it, plus 4 ms for the (1 - 0.5 ** 4) of the batches reaching it
    assert expected_seconds(row, [0.5, 0.5, 0.0]) * 1e3 == pytest.approx(0.25 + 0.96875 + 0.5 * 0.0625 + 0.9375)
    assert expected_seconds(row, [0.5, 0.5, 0.0]) * 1e3 == pytest.approx(2.1875)


def test_a_stage_pays_its_shape_change_cost_on_the_calls_whose_image_count_changes():
    from dvt_core.runtime.cost_model import count_change_chances, expected_seconds

    # 2 images, each reaching the stage with chance 0.5: counts 0 / 1 / 2 with 1/4, 1/2, 1/4; of the calls
    # (count 1 or 2, chances 2/3 and 1/3) two in a row have the same count with 4/9 + 1/9 = 5/9
    assert count_change_chances([1.0, 0.5, 0.0], 2) == pytest.approx([0.0, 4 / 9, 0.0])
    assert count_change_chances([1.0, 0.3, 0.05], 1) == pytest.approx([0.0, 0.0, 0.0])  # batch 1: always one image
    assert count_change_chances([1.0, 0.32, 0.05], 64)[1] > 0.9  # at batch 64 nearly every call changes count
    row = {"batch": 2, "stage_ms": [1.0, 2.0, 4.0], "stage_shape_ms": [0.0, 3.0, 5.0], "overhead_ms": 0.25}
    # stage 2 is called by (1 - 0.5 ** 2) / 2 = 3/8 of a call per image, 4/9 of those after another count
    assert expected_seconds(row, [0.5, 0.5, 0.0]) * 1e3 == pytest.approx(0.25 + 1.0 + 0.5 * 2.0 + 3 / 8 * 4 / 9 * 3.0)
    without = {k: v for k, v in row.items() if k != "stage_shape_ms"}
    assert expected_seconds(without, [0.5, 0.5, 0.0]) * 1e3 == pytest.approx(2.25)


def test_payoff_says_from_which_batch_size_early_exit_pays():
    from dvt_core.runtime.cost_model import payoff, payoff_lines

    shares = [0.6, 0.3, 0.1]  # expected: 0.5 + 1 + 0.4 * 2 + 0.1 * 4 = 2.7 ms at batch 1 against a 2 ms static model
    rows = payoff(_profile(batches=((1, STAGE_MS, 2.0), (64, [0.1, 0.4, 1.6], 1.0))), shares)
    assert [r["pays"] for r in rows] == [False, True]
    assert rows[0]["adaptive_ms"] == pytest.approx(2.7)
    lines = payoff_lines(_profile(batches=((1, STAGE_MS, 2.0), (64, [0.1, 0.4, 1.6], 1.0))), shares)
    assert "does not pay" in lines[0] and lines[-1].startswith("early exit starts to pay at batch 64")
    never = payoff_lines(_profile(batches=((1, STAGE_MS, 2.0), (64, [0.1, 0.4, 1.6], 0.1))), shares)
    assert "does not pay at any measured batch size (1, 64)" in never[-1]


# ---- stored profiles are untrusted ---------------------------------------------------------------------------

@pytest.mark.parametrize("change, fragment", [
    (lambda p: p["batches"][0].update(stage_ms=[1.0, -2.0, 4.0]), "cost_profile.batches[0].stage_ms[1]"),
    (lambda p: p["batches"][0].update(stage_ms=[1.0, 2.0, 1e9]), "cost_profile.batches[0].stage_ms[2]"),
    (lambda p: p["batches"][0].update(stage_ms=[1.0, 2.0]), "cost_profile.batches[0].stage_ms"),
    (lambda p: p["batches"][1].update(batch=1), "measured twice"),
    (lambda p: p.update(version=7), "cost_profile.version"),
    (lambda p: p["batches"][0].update(overhead_ms="fast"), "cost_profile.batches[0].overhead_ms"),
    (lambda p: p["batches"][1].update(stage_call_ms=[0.0, 0.0, 500.0]), "cost_profile.batches[1].stage_call_ms[2]"),
    (lambda p: p["batches"][0].update(stage_hot_ms=[1.0, 0.0, 4.0]), "cost_profile.batches[0].stage_hot_ms[1]"),
    (lambda p: p["batches"][1].update(stage_hot_ms=[0.1, 0.4, 1e9]), "cost_profile.batches[1].stage_hot_ms[2]"),
    (lambda p: p["batches"][0].update(stage_hot_ms=[1.0, 2.0]), "cost_profile.batches[0].stage_hot_ms"),
    (lambda p: p["batches"][0].update(stage_hot_ms="hot"), "cost_profile.batches[0].stage_hot_ms"),
    (lambda p: p["batches"][1].update(stage_shape_ms=[0.0, -1.0, 0.0]), "cost_profile.batches[1].stage_shape_ms[1]"),
    (lambda p: p["batches"][1].update(stage_shape_ms=[0.0, 1.0]), "cost_profile.batches[1].stage_shape_ms"),
])
def test_a_tampered_profile_is_refused_by_name(tmp_path, change, fragment):
    from dvt_core.checkpoint.files import read_checkpoint
    from dvt_core.errors import CheckpointError

    profile = _profile()
    change(profile)
    bad = _with_profile(tmp_path, "bad.safetensors", profile)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(bad)
    assert fragment in str(err.value)


def test_a_profile_from_another_runtime_precision_or_batch_is_refused(tmp_path):
    from dvt_core.errors import InputError
    from dvt_core.runtime.cost_model import batch_row, stored_profile

    meta = {"cost_profile": _profile()}
    with pytest.raises(InputError, match="measured for torch fp32, not onnx fp32"):
        stored_profile(meta, "onnx", "fp32", "x")
    with pytest.raises(InputError, match="not torch bf16"):
        stored_profile(meta, "torch", "bf16", "x")
    with pytest.raises(InputError, match="stores no cost profile"):
        stored_profile({}, "torch", "fp32", "x")
    with pytest.raises(InputError, match="batch size\\(s\\) 1, 64, not 8"):
        batch_row(stored_profile(meta, "torch", "fp32", "x"), 8)


# ---- dvt profile ----------------------------------------------------------------------------------------------

def test_profile_stores_a_checked_profile_with_its_machine(profiled):
    from dvt_core.checkpoint.files import read_checkpoint

    tmp, r = profiled
    meta = read_checkpoint(tmp / "p.safetensors").meta
    profile = meta["cost_profile"]
    assert profile == json.loads((tmp / "p.json").read_text())
    assert (profile["runtime"], profile["precision"]) == ("torch", "fp32")
    assert [b["batch"] for b in profile["batches"]] == [1, 4]
    assert all(len(b["stage_ms"]) == 3 and min(b["stage_ms"]) > 0 and b["static_ms"] > 0 for b in profile["batches"])
    for b in profile["batches"]:  # each stage's time when the batch before left at its exit; the last's all-through
        assert len(b["stage_hot_ms"]) == 3 and min(b["stage_hot_ms"]) > 0
        assert b["stage_hot_ms"][2] == b["stage_ms"][2] and b["stage_hot_ms"][:2] != b["stage_ms"][:2]
    assert all(0 <= f <= ms * 4 for f, ms in zip(profile["batches"][1]["stage_call_ms"], profile["batches"][1]["stage_ms"]))
    # at batch 4 each later stage's extra cost after a call with another image count; none at batch 1
    assert "stage_shape_ms" not in profile["batches"][0]
    shape = profile["batches"][1]["stage_shape_ms"]
    assert len(shape) == 3 and shape[0] == 0.0 and min(shape) >= 0.0
    assert profile["machine"]["cpu"] and isinstance(profile["machine"]["amx"], bool)
    assert "torch" in profile["machine"]["versions"]
    assert meta["thresholds"] == read_checkpoint(SHIPPED).meta["thresholds"]  # the rest of the metadata is kept
    assert "batch 1:" in r.stdout and "batch 4:" in r.stdout and "wrote" in r.stdout


def test_profile_out_and_force_rules(profiled, tmp_path):
    tmp, _ = profiled
    copy = tmp_path / "copy.safetensors"
    shutil.copy(tmp / "p.safetensors", copy)
    before = copy.read_bytes()
    quick = ("--images", "1", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0")
    user_error(dvt("profile", "--weights", "default", "--model", "dvt_fashion_mnist", *quick, cwd=tmp_path),
               "refusing to modify the shipped weights")
    user_error(dvt("profile", "--weights", copy, *quick, cwd=tmp_path), "pass --force")
    user_error(dvt("profile", "--weights", "default", "--model", "dvt_fashion_mnist", "--out", copy, *quick,
                   cwd=tmp_path), "exists")
    assert copy.read_bytes() == before  # nothing written by a refused run
    ok(dvt("profile", "--weights", copy, "--force", *quick, cwd=tmp_path))
    from dvt_core.checkpoint.files import read_checkpoint

    assert [b["batch"] for b in read_checkpoint(copy).meta["cost_profile"]["batches"]] == [1]


def test_profile_of_an_export_keeps_its_checks(fashion_cli):
    from dvt_core.errors import ManifestError
    from dvt_core.export.manifest import read_manifest

    folder = fashion_cli / "fm"
    quick = ("--images", "2", "--batch-sizes", "2", "--repeats", "1", "--warmup", "0", "--backend", "onnx")
    user_error(dvt("profile", "--weights", folder, *quick, cwd=fashion_cli), "--force")
    user_error(dvt("profile", "--weights", folder, "--out", "x.safetensors", "--force", *quick, cwd=fashion_cli),
               "drop --out")
    ok(dvt("profile", "--weights", folder, "--force", *quick, cwd=fashion_cli))
    m = read_manifest(folder, verify=True)  # hashes and checks still pass
    assert m["cost_profile"]["runtime"] == "onnx"
    assert m["checkpoint_meta"]["cost_profile"] == m["cost_profile"]
    manifest = json.loads((folder / "dvt.json").read_text())
    manifest["cost_profile"]["batches"][0]["stage_ms"][0] = float("1e12")
    (folder / "dvt.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"cost_profile\.batches\[0\]\.stage_ms\[0\]"):
        read_manifest(folder, verify=True)
    manifest["cost_profile"] = manifest["checkpoint_meta"]["cost_profile"]
    (folder / "dvt.json").write_text(json.dumps(manifest))  # restored for the other tests of the module
    read_manifest(folder, verify=True)


# ---- the budget in seconds through the commands -----------------------------------------------------------------

@needs_fashion
def test_calibrate_and_predict_with_a_latency_budget(tmp_path, fashion_cli):
    from dvt_core.checkpoint.files import read_checkpoint

    src = _with_profile(tmp_path, "prof.safetensors", _profile())
    user_error(dvt("calibrate", "--weights", src, "--latency-budget", "3ms", "--out", "x.safetensors",
                   "--precision", "bf16", "--limit", "50", cwd=tmp_path), "measured for torch fp32, not torch bf16")
    user_error(dvt("calibrate", "--weights", src, "--latency-budget", "3ms", "--profile-batch", "8",
                   "--out", "x.safetensors", "--limit", "50", cwd=tmp_path), "not 8")
    user_error(dvt("calibrate", "--weights", "default", "--model", "dvt_fashion_mnist", "--latency-budget", "3ms",
                   "--out", "x.safetensors", "--limit", "50", cwd=tmp_path), "no cost profile")
    r = ok(dvt("calibrate", "--weights", src, "--latency-budget", "3ms", "--out", "cal.safetensors", "--limit", "300",
               cwd=tmp_path))
    meta = read_checkpoint(tmp_path / "cal.safetensors").meta
    cal = meta["calibration"]
    assert cal["holdout_ms"] <= 3.0
    assert cal["holdout_ms"] == pytest.approx(OVERHEAD_MS + np.asarray(cal["exit_shares"]) @ np.cumsum(STAGE_MS))
    assert meta["cost_profile"] == _profile()
    # the made-up static model: 6 ms at batch 1 (beaten at 3 ms), 0.3 ms at 64 (at least 0.1 + 0.4 * 0.4 there)
    assert "batch 64: early exit does not pay" in r.stdout and "pays only at batch 1" in r.stdout
    p = ok(dvt("predict", fashion_cli / "img0.png", "--weights", "cal.safetensors", "--latency-budget", "3ms",
               "--batch-size", "1", cwd=tmp_path))
    assert f"{', '.join(f'{t:.4f}' for t in meta['thresholds'][:-1])}" in p.stderr
    assert "latency budget 3 ms" in p.stderr
    user_error(dvt("predict", fashion_cli / "img0.png", "--weights", "cal.safetensors", "--latency-budget", "1ms",
                   "--batch-size", "1", cwd=tmp_path), "1.5 ms")


def test_benchmark_prints_the_profile_prediction(profiled):
    tmp, _ = profiled
    r = ok(dvt("benchmark", "dvt_fashion_mnist", "--weights", tmp / "p.safetensors", "--batch-sizes", "1",
               "--images", "2", "--repeats", "1", "--warmup", "0", "--modes", "adaptive", "--no-timm", cwd=tmp))
    assert "cost profile predicts" in r.stdout and "realised" in r.stdout
    assert "cost profile: early exit" in r.stdout
