"""Streaming early exit (dvt_core.runtime.streaming): per-stage queues that gather full batches.

It must give every image the exit, prediction, confidence and logits that per-batch ``adaptive`` and
the all-exit policy give (images within ``TIE`` of a threshold excepted, as in test_early_exit), in
input order, while running the later stages fewer times, on full batches gathered from several
input batches.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dvt_core.runtime import evaluation
from dvt_core.runtime.contract import backend_of
from dvt_core.runtime.streaming import StreamingAdaptive, prefetch, stream_adaptive
from helpers import TIE, assert_matches, full_run, make_images, reference, small_model, spread_thresholds


def recording(model, monkeypatch):
    """The model, its runtime's ``run_stage`` wrapped (for this test) to record (stage, batch size) of every call."""
    calls = []
    runtime = backend_of(model)
    run = runtime.run_stage

    def spy(m, i, images, carry=None):
        calls.append((i, int(images.shape[0])))
        return run(m, i, images, carry)

    monkeypatch.setattr(runtime, "run_stage", spy)
    return model, calls


@pytest.mark.parametrize("family,feature_reuse,relation_reuse",
                         [("t2t", True, True), ("vit", True, True), ("vit", False, True), ("t2t", True, False)])
def test_streaming_equals_per_batch_adaptive_in_input_order(family, feature_reuse, relation_reuse, monkeypatch):
    model = small_model(family, feature_reuse, relation_reuse)
    images = make_images(model, 45, seed=3)
    logits, conf = full_run(model, images)
    thresholds = spread_thresholds(conf)
    ref = reference(logits, conf, thresholds, model.exit_macs)
    bs = 6
    per_batch = [model.adaptive(images[s:s + bs], thresholds) for s in range(0, len(images), bs)]
    _, calls = recording(model, monkeypatch)
    result = stream_adaptive(model, (images[s:s + bs].numpy() for s in range(0, len(images), bs)), thresholds, bs)

    assert_matches(result, ref, model.spec.num_exits)
    keep = ~ref["ambiguous"]
    assert keep.mean() > 0.9
    for name in ("exit_index", "prediction", "macs"):
        want = np.concatenate([getattr(r, name) for r in per_batch])
        np.testing.assert_array_equal(getattr(result, name)[keep], want[keep], err_msg=name)
    np.testing.assert_allclose(result.logits[keep], np.concatenate([r.logits for r in per_batch])[keep],
                               rtol=0, atol=TIE)
    np.testing.assert_array_equal(result.exit_counts, np.bincount(result.exit_index, minlength=3))

    # the later stages ran on gathered batches: full ones, except the last flush of each stage
    first = [n for i, n in calls if i == 0]
    assert first == [6] * 7 + [3]
    for k in (1, 2):
        sizes = [n for i, n in calls if i == k]
        assert sum(sizes) == int((ref["exit"] >= k).sum()) or not keep.all()
        assert all(n >= bs for n in sizes[:-1]), (k, sizes)
        assert len(sizes) < len(first), (k, sizes)


def test_streaming_engine_takes_batches_of_any_size_and_feeds_nothing_twice(monkeypatch):
    model = small_model("vit")
    images = make_images(model, 20, seed=5)
    logits, conf = full_run(model, images)
    thresholds = spread_thresholds(conf)
    ref = reference(logits, conf, thresholds, model.exit_macs)
    _, calls = recording(model, monkeypatch)
    engine = StreamingAdaptive(model, thresholds, batch_size=8)
    with backend_of(model).inference(model):
        for a, b in [(0, 1), (1, 9), (9, 9), (9, 20)]:  # 1, 8, 0 and 11 images
            engine.feed(images[a:b])
        result = engine.finish()
    assert_matches(result, ref, model.spec.num_exits)
    assert sum(n for i, n in calls if i == 0) == 20
    assert sum(n for i, n in calls if i == 1) == int((result.exit_index >= 1).sum())
    assert sum(n for i, n in calls if i == 2) == int((result.exit_index >= 2).sum())


def test_empty_input_gives_an_empty_result():
    model = small_model("t2t")
    result = stream_adaptive(model, [], [0.5, 0.5], 4)
    assert len(result) == 0 and result.exit_counts.tolist() == [0, 0, 0]


def test_evaluation_adaptive_streams_by_default_and_matches_per_batch():
    model = small_model("t2t")
    rng = np.random.default_rng(0)
    s = model.spec
    images = rng.integers(0, 256, (40, s.img_size, s.img_size, s.in_chans), dtype=np.uint8)
    x = torch.from_numpy(evaluation.dvt_data.normalize(images, s.mean, s.std))
    logits, conf = full_run(model, x)
    thresholds = spread_thresholds(conf)
    ref = reference(logits, conf, thresholds, model.exit_macs)
    streamed = evaluation.adaptive(model, images, thresholds, batch_size=7)
    batched = evaluation.adaptive(model, images, thresholds, batch_size=7, streaming=False)
    assert_matches(streamed, ref, s.num_exits)
    assert_matches(batched, ref, s.num_exits)
    assert model.training is False


def test_adaptive_files_decodes_in_parallel_and_keeps_file_order(tmp_path):
    from PIL import Image

    model = small_model("vit")
    s = model.spec
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (23, s.img_size, s.img_size, 3), dtype=np.uint8)
    files = []
    for i, im in enumerate(images):
        f = tmp_path / f"img_{22 - i:02d}.png"  # names sort against the input order
        Image.fromarray(im).save(f)
        files.append(str(f))
    want = evaluation.adaptive(model, images, [0.3, 0.3], batch_size=5, streaming=False)
    got = evaluation.adaptive_files(model, files, [0.3, 0.3], batch_size=5, workers=3)
    np.testing.assert_array_equal(got.exit_index, want.exit_index)
    np.testing.assert_array_equal(got.prediction, want.prediction)
    np.testing.assert_allclose(got.logits, want.logits, rtol=0, atol=TIE)


def test_prefetch_keeps_order_with_and_without_threads():
    items = list(range(23))
    for workers in (0, 1, 4):
        batches = list(prefetch(items, lambda v: np.array([v]), 5, workers=workers))
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        assert np.concatenate(batches).ravel().tolist() == items


@pytest.mark.mindspore
def test_mindspore_streaming_equals_its_adaptive():
    pytest.importorskip("mindspore")
    import dvt_core
    from dvt_backends.mindspore import compat as C

    model = dvt_core.build("dvt_deit_tiny", backend="mindspore", embed_dim=32, depth=2, num_heads=2, img_size=32,
                           grids=(2, 3, 4), num_classes=10)
    x = np.random.default_rng(2).standard_normal((14, 3, 32, 32)).astype(np.float32)
    from dvt_backends.mindspore import RUNTIME

    forward_numpy = RUNTIME.forward_numpy
    from dvt_core.runtime import policy

    conf = policy.confidence(policy.softmax(np.stack(forward_numpy(model, x))))
    thresholds = spread_thresholds(conf)  # a third of the images per exit, none on a threshold
    want = model.adaptive(C.to_tensor(x), thresholds)
    assert 0 < int((want.exit_index == 0).sum()) < 14, want.exit_index
    got = stream_adaptive(model, (x[s:s + 4] for s in range(0, 14, 4)), thresholds, 4)
    np.testing.assert_array_equal(got.exit_index, want.exit_index)
    np.testing.assert_array_equal(got.prediction, want.prediction)
    np.testing.assert_allclose(got.logits, want.logits, rtol=0, atol=1e-5)


@pytest.mark.export
def test_streaming_on_an_onnx_export_joins_its_numpy_carries(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import dvt_core
    from dvt_core.export.writer import export_model

    model = small_model("vit")
    out = export_model(model, "onnx", tmp_path / "deit")
    rt = dvt_core.build(out, backend="onnx")
    images = make_images(model, 20, seed=7)
    logits, conf = full_run(model, images)
    thresholds = spread_thresholds(conf)
    ref = reference(logits, conf, thresholds, model.exit_macs)
    _, calls = recording(rt, monkeypatch)
    got = stream_adaptive(rt, (images[s:s + 3].numpy() for s in range(0, 20, 3)), thresholds, 3)
    assert_matches(got, ref, model.spec.num_exits)
    assert len([n for i, n in calls if i == 2]) < 7  # later stages ran on gathered batches
