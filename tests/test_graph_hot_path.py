"""The exported runtimes' batch-1 hot path: graphs without per-reshape shape arithmetic, OpenVINO's fixed-shape
requests filled in place (whose outputs a later call must not overwrite), and early exit one image at a time
taking the exits of the whole batch."""
from __future__ import annotations

import numpy as np
import pytest

import dvt_core
from dvt_core.errors import InputError
from dvt_core.runtime.contract import backend_of
from dvt_core.export.writer import export_model

from helpers import SMALL, median_thresholds
from strict_skips import in_ci

if in_ci():
    import onnx
    import openvino  # noqa: F401
    import torch
else:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    torch = pytest.importorskip("torch")

pytestmark = pytest.mark.export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small DVT-DeiT (feature and relation reuse), its ONNX export, images and thresholds between confidences."""
    torch.manual_seed(0)
    model = dvt_core.build("dvt_deit_small", backend="torch", **SMALL).eval()
    images = np.random.default_rng(2).standard_normal((8, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = [o.numpy() for o in model(torch.from_numpy(images))]
    from dvt_core.runtime import policy

    thresholds = median_thresholds([policy.softmax(lg).max(1) for lg in ref], gap=2e-4) + [-1e8]
    out = export_model(model, "onnx", tmp_path_factory.mktemp("hot") / "deit")
    return out, images, thresholds


def test_reshape_targets_are_constants_but_the_batch_axis(exported):
    """Only the batch axis is dynamic, so no reshape reads its target from the tensor's shape: a stage has at
    most the two Shape nodes of the class token's broadcast, where the modules' own forms traced one per
    reshape (23 in the shipped model's first stage)."""
    out, _, _ = exported
    for path in sorted(out.glob("stage*.onnx")):
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ops.count("Shape") <= 2, (path.name, ops.count("Shape"))
        assert ops.count("Reshape") >= 4  # the attention's reshapes are still there, with constant targets


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_batch_1_outputs_outlive_the_next_call_and_join_as_streaming_does(exported, backend):
    """Two images run one at a time through stage 1: the first call's logits and carry stay as they were after
    the second call (OpenVINO's fixed-shape request reuses its buffers), and the two carries joined (what
    streaming early exit does) give stage 2 the logits of the two images run as one batch."""
    out, images, _ = exported
    model = dvt_core.build(out, backend=backend, threads=1)
    runtime = backend_of(model)
    a, b = images[:1], images[1:2]
    logits_a, carry_a = runtime.run_stage(model, 0, a)
    kept = np.array(logits_a), {k: np.array(v) for k, v in carry_a.items()}
    logits_b, carry_b = runtime.run_stage(model, 0, b)
    assert np.array_equal(logits_a, kept[0]) and not np.allclose(logits_a, logits_b)
    for k, v in carry_a.items():
        assert np.array_equal(v, kept[1][k]) and not np.allclose(v, carry_b[k])
    joined_images, joined = runtime.join([(a, carry_a), (b, carry_b)])
    logits, _ = runtime.run_stage(model, 1, joined_images, joined)
    expected, _ = runtime.run_stage(model, 1, images[:2], runtime.run_stage(model, 0, images[:2])[1])
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_openvino_batch_1_refuses_a_carry_of_another_shape(exported):
    """A batch-1 call copies into the request's own buffers: a carry of the wrong shape is an InputError,
    never broadcast into them."""
    out, images, _ = exported
    model = dvt_core.build(out, backend="openvino", threads=1)
    _, carry = model.run_stage(0, images[:1])
    key = next(iter(carry))
    carry[key] = carry[key][:, :1]
    with pytest.raises(InputError, match="shape"):
        model.run_stage(1, images[:1], carry)


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_early_exit_one_image_at_a_time_takes_the_batch_exits(exported, backend):
    """Batch 1 takes the host loop's shortcuts (no masks, slices for the rows): every image's exit, prediction,
    logits and per-exit confidences are those of the same image in the whole batch."""
    out, images, thresholds = exported
    model = dvt_core.build(out, backend=backend, threads=1)
    whole = model.adaptive(images, thresholds)
    assert 0 < whole.exit_counts[0] < len(images)  # the thresholds send images to more than one exit
    for j in range(len(images)):
        one = model.adaptive(images[j:j + 1], thresholds)
        assert one.exit_index[0] == whole.exit_index[j] and one.prediction[0] == whole.prediction[j]
        assert one.macs[0] == whole.macs[j] and one.exit_counts[one.exit_index[0]] == 1
        np.testing.assert_allclose(one.logits[0], whole.logits[j], atol=1e-5)
        np.testing.assert_allclose(one.exit_confidences[0], whole.exit_confidences[j], atol=1e-5)  # NaN alike
