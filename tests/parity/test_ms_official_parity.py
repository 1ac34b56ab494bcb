"""torch / MindSpore parity for dvt_ms_deit_small: every reuse combination and both feature-reuse norms,
both backends loading one ``.ckpt`` in the layout of the authors' MindSpore code (small overrides).

The zoo-wide suite (test_parity.py) covers the default configuration through converted checkpoints; this
adds the ablations, the LayerNorm switch and that code's own file layout.
"""
from __future__ import annotations

import pytest

ms = pytest.importorskip("mindspore", reason="the MindSpore backend needs mindspore")
torch = pytest.importorskip("torch", reason="parity compares against the PyTorch backend")

from dvt_backends.mindspore import RUNTIME as bm  # noqa: E402
from dvt_backends.torch import RUNTIME as bt  # noqa: E402
import dvt_core  # noqa: E402
import reference_ms_official as R  # noqa: E402
from official import exit_differences  # noqa: E402

from .conftest import random_images, record_worst  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.mindspore]

NAME = "dvt_ms_deit_small"
SMALL = dict(img_size=32, grids=(2, 4), depth=2, embed_dim=32, num_heads=2, num_classes=10)


@pytest.mark.parametrize("overrides", [
    pytest.param({}, id="both_reuses"),
    pytest.param({"relation_reuse": False}, id="feature_reuse_only"),
    pytest.param({"feature_reuse": False}, id="relation_reuse_only"),
    pytest.param({"feature_reuse": False, "relation_reuse": False}, id="no_reuse"),
    pytest.param({"feature_reuse_norm": "apply"}, id="feature_reuse_norm_applied"),
    pytest.param({"gelu": "exact"}, id="exact_gelu"),
])
def test_backends_agree_on_official_ckpt(overrides, tmp_path):
    spec = dvt_core.get_spec(NAME, **SMALL, **overrides)
    shapes = R.ms_official_shapes(spec)
    path = tmp_path / "official.ckpt"
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in R.ms_official_state(shapes).items()], str(path))
    images = random_images(spec, 8)
    tm = dvt_core.build(NAME, backend="torch", weights=path, **SMALL, **overrides)
    mm = dvt_core.build(NAME, backend="mindspore", weights=path, **SMALL, **overrides)
    diffs = exit_differences(bm.forward_numpy(mm, images), bt.forward_numpy(tm, images))
    record_worst(f"{NAME} official .ckpt {overrides or ''}", diffs)
    assert max(diffs) <= 1e-4, diffs
