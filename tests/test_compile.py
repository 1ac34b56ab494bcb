"""Opt-in compilation of the torch stages (``model.compile()`` / ``build(..., compile=True)``).

The test compiles with the ``eager`` backend: TorchDynamo captures the stages as it does for the
default (inductor) backend, dynamic shapes and guards included, without generating code (inductor
takes minutes on a 2-core machine; measured separately, same outputs within 1e-7); the compiled model must give the eager model's outputs and early-exit answers, and must not
recompile when early exit hands a stage another number of images.
"""
from __future__ import annotations

import numpy as np
import pytest

import dvt_core
from dvt_core import InputError
from helpers import median_thresholds

torch = pytest.importorskip("torch")

SMALL = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, grids=(2, 3, 4), num_classes=10)


def test_compiled_stages_give_eager_outputs_and_do_not_recompile_per_batch_size():
    torch.manual_seed(0)
    eager = dvt_core.build("dvt_deit_tiny", **SMALL).eval()
    compiled = dvt_core.build("dvt_deit_tiny", **SMALL).eval()
    compiled.load_state_dict(eager.state_dict())
    assert compiled.compile(backend="eager") is compiled
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(eager(x), compiled(x)):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    with torch.no_grad():
        conf = [o.softmax(-1).amax(-1) for o in eager(x)]
    thresholds = median_thresholds([c.numpy() for c in conf], slack=1)
    want = eager.adaptive(x, thresholds)
    assert len(set(want.exit_index.tolist())) > 1
    compiled.adaptive(x, thresholds)
    from torch import _dynamo

    # batch sizes whose later stages never see exactly one image (a shape torch specialises on)
    sizes = [n for n in range(11, 2, -1) if all((want.exit_index[:n] >= k).sum() != 1 for k in (1, 2))][:3]
    assert len(sizes) == 3
    with _dynamo.config.patch(error_on_recompile=True):  # other batch sizes: no recompilation
        for n in sizes:
            got = compiled.adaptive(x[:n], thresholds)
            np.testing.assert_array_equal(got.exit_index, want.exit_index[:n])
            np.testing.assert_array_equal(got.prediction, want.prediction[:n])
            np.testing.assert_allclose(got.logits, want.logits[:n], rtol=0, atol=1e-5)


def test_compiled_stages_see_a_symbolic_batch_axis_and_a_fixed_image_size():
    """What Inductor failed on (``ValueRangeError`` in the patch arithmetic of the shipped model): every axis
    symbolic. The graphs the compiler receives must vary in the batch axis of the images and the carry, and
    in nothing else."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    torch.manual_seed(0)
    model = dvt_core.build("dvt_deit_tiny", **SMALL).eval()
    shapes = []

    def recording_backend(gm, example_inputs):
        shapes.extend(tuple(n.meta["example_value"].shape) for n in gm.graph.nodes
                      if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.Tensor))
        return gm.forward

    model.compile(backend=recording_backend)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        model(x)
    image_shapes = [s for s in shapes if len(s) == 4 and s[1:] == (3, 32, 32)]
    assert len(image_shapes) == 3  # one graph per stage, each with its images
    for shape in shapes:
        kinds = [not is_concrete_int(d) for d in shape]
        if len(shape) >= 3 and kinds[0]:  # the images and the carried tensors: batch symbolic, the rest fixed
            assert not any(kinds[1:]), shape
    assert not any(is_concrete_int(s[0]) for s in image_shapes)


def test_build_compile_flag(monkeypatch):
    from dvt_backends.torch import DVT

    seen = []

    monkeypatch.setattr(DVT, "compile", lambda self, **kw: seen.append(kw) or self)
    model = dvt_core.build("dvt_deit_tiny", compile=True, **SMALL)
    assert seen == [{}] and isinstance(model, DVT)
    dvt_core.build("dvt_deit_tiny", **SMALL)
    assert seen == [{}]


@pytest.mark.mindspore
def test_mindspore_refuses_compile_with_a_pointer_to_graph_mode():
    pytest.importorskip("mindspore")
    with pytest.raises(InputError, match="compiled"):
        dvt_core.build("dvt_deit_tiny", backend="mindspore", compile=True, **SMALL)
