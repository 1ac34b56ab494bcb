"""The PyTorch backend: input checks, strict and safe checkpoint loading, training, dtypes, round trips.

Everything runs on small override models (a few thousand parameters) so the file stays fast.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import dvt_core
from dvt_backends.torch import DVT, RUNTIME

model_state = RUNTIME.model_state
from dvt_core import CheckpointError, InputError, UnsafeCheckpointError
from dvt_core.checkpoint.files import write_checkpoint

REPO = Path(__file__).resolve().parents[1]

SMALL_T2T = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, grids=(2, 3, 4), token_dim=16, num_classes=10)
SMALL_VIT = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, grids=(2, 3, 4), num_classes=10)


def small(name="dvt_t2t_vit_12", weights=None, **extra):
    overrides = dict(SMALL_T2T if "t2t" in name else SMALL_VIT, **extra)
    return dvt_core.build(name, weights=weights, **overrides)


def images(model, n=2, seed=0, dtype=torch.float32):
    s = model.spec
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, s.in_chans, s.img_size, s.img_size, generator=g).to(dtype)


@pytest.fixture(scope="module")
def t2t():
    torch.manual_seed(0)
    return small().eval()


# ---- input errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,pattern", [
    ((3, 32, 32), r"rank 3"),
    ((2, 1, 3, 32, 32), r"rank 5"),
    ((2, 1, 32, 32), r"3 channel.*has 1"),
    ((2, 4, 32, 32), r"3 channel.*has 4"),
    ((2, 3, 31, 31), r"32x32 images; got 31x31"),
    ((2, 3, 32, 40), r"32x32 images; got 32x40"),
    ((0, 3, 32, 32), r"empty"),
])
def test_bad_image_batch_is_named(t2t, shape, pattern):
    with pytest.raises(InputError, match=pattern) as info:
        t2t(torch.zeros(shape))
    assert isinstance(info.value, ValueError)


def test_non_tensor_input_is_named(t2t):
    with pytest.raises(InputError, match="torch.Tensor"):
        t2t(np.zeros((1, 3, 32, 32), dtype=np.float32))


def test_errors_are_value_errors():
    for cls in (InputError, CheckpointError, UnsafeCheckpointError, dvt_core.SpecError):
        assert issubclass(cls, ValueError)
    assert issubclass(UnsafeCheckpointError, CheckpointError)


# ---- strict loading -------------------------------------------------------------------------------

def test_missing_unexpected_and_mismatched_keys_are_listed(t2t, tmp_path):
    state = model_state(t2t)
    gone = "stages.1.blocks.0.attn.qkv.weight"
    resized = "stages.2.head.weight"
    extra = "stages.0.blocks.0.attn.extra_gate"
    del state[gone]
    state[resized] = np.zeros((3, 3), np.float32)
    state[extra] = np.zeros(4, np.float32)
    path = write_checkpoint(tmp_path / "bad.safetensors", state)
    with pytest.raises(CheckpointError) as info:
        small(weights=path)
    err = info.value
    assert not isinstance(err, UnsafeCheckpointError)
    assert err.missing == [gone]
    assert err.unexpected == [extra]
    assert len(err.mismatched) == 1 and err.mismatched[0].startswith(resized)
    msg = str(err)
    for needle in (gone, extra, resized, "1 missing", "1 unexpected", "1 mismatched", "(3, 3)", "(10, 32)"):
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_checkpoint_of_another_architecture_is_refused(t2t, tmp_path):
    """A T2T state dict does not load into a ViT of the same size: every difference is listed."""
    path = write_checkpoint(tmp_path / "t2t.safetensors", model_state(t2t))
    with pytest.raises(CheckpointError) as info:
        small("dvt_deit_small", weights=path)
    assert info.value.missing and info.value.unexpected
    assert "stages.0.tokenizer.proj.weight" in info.value.missing


@pytest.mark.parametrize("content", [
    pytest.param(bytes(np.random.default_rng(7).integers(11, 256, 4096, dtype=np.uint8)), id="random_bytes"),
    pytest.param(b"", id="empty"),
    pytest.param(b"model weights, honest\n" * 10, id="text"),
])
def test_file_that_is_no_checkpoint(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        small(weights=path)


@pytest.mark.parametrize("suffix,pattern", [(".pth", "truncated or corrupt"),
                                            (".safetensors", "not a readable safetensors file")])
def test_truncated_checkpoint(t2t, tmp_path, suffix, pattern):
    full = write_checkpoint(tmp_path / f"full{suffix}", model_state(t2t))
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=pattern):
        small(weights=cut)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        small(weights=tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="directory"):
        small(weights=tmp_path)


def test_state_dict_with_non_tensor_entries(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"stages.0.cls_token": torch.zeros(1, 1, 32), "note": [1, 2, 3]}, path)
    with pytest.raises(CheckpointError, match="'note' is a list, not a tensor"):
        small(weights=path)


class _Payload:
    """Unpickling this calls ``open(path, "w")``: it creates a file, i.e. runs code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch_save", "raw_pickle", "torch_save_protocol4"])
def test_pickle_that_would_run_code_is_refused(t2t, tmp_path, how):
    marker = tmp_path / "pwned"
    # the payload really runs code when unpickled the unsafe way (in a separate file, on purpose)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()

    state = {k: torch.from_numpy(v) for k, v in model_state(t2t).items()}
    obj = {"state_dict": state, "dvt_meta": "{}", "extra": _Payload(marker)}
    path = tmp_path / "evil.pth.tar"
    if how == "torch_save":
        torch.save(obj, path)
    elif how == "torch_save_protocol4":
        torch.save(obj, path, pickle_protocol=4)
    else:
        path.write_bytes(pickle.dumps({"model_state_dict": {}, "x": _Payload(marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="refused") as info:
        small(weights=path)
    assert str(path) in str(info.value)
    assert not marker.exists(), "loading the checkpoint ran code from its pickle"


# ---- training -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dvt_t2t_vit_12", "dvt_deit_small"])
def test_gradients_reach_every_trainable_parameter(name):
    torch.manual_seed(1)
    model = small(name, depth=2).train()
    assert model.spec.feature_reuse and model.spec.relation_reuse
    x = images(model, n=3)
    targets = torch.tensor([0, 3, 9])
    outputs = model(x)
    loss = DVT.loss(outputs, targets)
    expected = sum(torch.nn.functional.cross_entropy(o, targets) for o in outputs)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    zero = {n for n, p in trainable.items() if p.grad is not None and not p.grad.abs().sum() > 0}
    bad = [n for n, p in trainable.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not no_grad, f"no gradient reaches {no_grad}"
    assert not bad, f"non-finite gradient for {bad}"
    # The one exception, as in the official model: the last exit reads only the class token, whose
    # reused-feature slot is zero, and the last block's MLP is the last thing before the head, so the
    # feature-reuse MLP of the last block of the last stage cannot influence any loss.
    last = f"stages.{model.spec.num_exits - 1}.blocks.{model.spec.stages[-1].depth - 1}.feature_reuse."
    assert zero == {n for n in trainable if n.startswith(last)}, f"zero gradient for {sorted(zero)}"
    # frozen by design: the T2T Performer's random features and the sinusoid position table
    if "t2t" in name:
        assert frozen == {f"stages.{i}.{p}" for i in range(3) for p in
                          ("pos_embed", "tokenizer.attention1.w", "tokenizer.attention2.w")}
    else:
        assert frozen == set()
    for n in frozen:
        assert dict(model.named_parameters())[n].grad is None
    # reuse carries gradient back into the earlier stages from the later exits alone
    model.zero_grad()
    DVT.loss(model(x)[2:], targets).backward()
    assert model.stages[1].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.stages[0].blocks[0].mlp.fc1.weight.grad.abs().sum() > 0


def test_loss_weights_and_label_smoothing():
    out = (torch.randn(4, 5), torch.randn(4, 5))
    t = torch.tensor([0, 1, 2, 3])
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(DVT.loss(out, t, weights=[0.25, 2.0]), 0.25 * ce(out[0], t) + 2.0 * ce(out[1], t))
    torch.testing.assert_close(DVT.loss(out, t, label_smoothing=0.1),
                               ce(out[0], t, label_smoothing=0.1) + ce(out[1], t, label_smoothing=0.1))


# ---- device / dtype -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dvt_t2t_vit_12", "dvt_deit_small"])
def test_float64_agrees_with_float32(name):
    torch.manual_seed(2)
    model = small(name).eval()
    x = images(model)
    with torch.no_grad():
        single = model(x)
        model.to(torch.float64)
        double = model(x.double())
    for i, (a, b) in enumerate(zip(single, double)):
        assert b.dtype == torch.float64
        rel = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert rel < 1e-4, f"exit {i + 1}: float32 vs float64 relative difference {rel:.2e}"


def test_no_cuda_calls_in_library_source():
    """Tensors follow the model's device: no hard-coded CUDA call anywhere (the official code had one), and the
    model modules never name a device at all (device choice lives in the CLI / training code)."""
    offenders = []
    model_files = {REPO / "backends" / "torch" / f"{m}.py" for m in ("cascade", "layers", "tokenizers", "io")}
    for folder in ("dvt_core", "backends"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\.cuda\s*\(", line) or (path in model_files and "cuda" in line):
                    offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not offenders, "device-specific calls:\n" + "\n".join(offenders)


# ---- round trips through write_checkpoint -----------------------------------------------------------

@pytest.mark.convert
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("with_spec", [True, False], ids=["with_spec", "weights_only"])
def test_round_trip_gives_identical_outputs(t2t, tmp_path, suffix, with_spec):
    meta = {"arch": t2t.spec.name, "spec": t2t.spec.to_dict()} if with_spec else {}
    path = write_checkpoint(tmp_path / f"m{suffix}", model_state(t2t), meta)
    if with_spec:
        again = dvt_core.build(weights=path).eval()  # the spec travels with the weights
        assert again.spec == t2t.spec
        assert again.checkpoint_meta["spec"] == t2t.spec.to_dict()
    else:
        again = small(weights=path).eval()
    x = images(t2t)
    with torch.no_grad():
        for a, b in zip(t2t(x), again(x)):
            assert torch.equal(a, b)
    for k, v in t2t.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


@pytest.mark.convert
def test_checkpoint_names_another_model(t2t, tmp_path):
    path = write_checkpoint(tmp_path / "m.safetensors", model_state(t2t),
                            {"arch": t2t.spec.name, "spec": t2t.spec.to_dict()})
    with pytest.raises(CheckpointError, match="dvt_deit_tiny"):
        dvt_core.build("dvt_deit_tiny", weights=path)


@pytest.mark.convert
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_write_checkpoint_refuses_to_overwrite(t2t, tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    state = model_state(t2t)
    write_checkpoint(path, state)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        write_checkpoint(path, {k: v + 1 for k, v in state.items()})
    assert path.read_bytes() == before
    write_checkpoint(path, {k: v + 1 for k, v in state.items()}, force=True)
    assert path.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.convert
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_failed_write_leaves_no_file(tmp_path, suffix):
    bad = {"a": np.zeros(3, np.float32), "b": np.array([object(), object()])}  # no format stores objects
    with pytest.raises(Exception):
        write_checkpoint(tmp_path / f"new{suffix}", bad)
    assert list(tmp_path.iterdir()) == []
    # a failed forced overwrite keeps the old file intact and leaves no temporary file either
    old = write_checkpoint(tmp_path / f"old{suffix}", {"a": np.ones(3, np.float32)})
    before = old.read_bytes()
    with pytest.raises(Exception):
        write_checkpoint(old, bad, force=True)
    assert old.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [old.name]


@pytest.mark.convert
def test_write_checkpoint_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="suffix"):
        write_checkpoint(tmp_path / "m.weights", {"a": np.zeros(1, np.float32)})
    assert list(tmp_path.iterdir()) == []


def test_prepacked_linear_follows_its_weight_and_is_never_saved():
    """In CPU inference Linear runs on a weight laid out once for oneDNN: same outputs as F.linear, rebuilt when
    the weight changes in place, absent from the state dict, pickles and copies; autograd takes the plain path."""
    import copy

    from torch.nn import functional as F

    from dvt_backends.torch.layers import Linear

    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        lin = Linear(384, 256).to(dtype)
        x = torch.randn(3, 50, 384).to(dtype)  # 14.7 M multiply-adds: above both dtypes' prepacking threshold
        with torch.no_grad():
            torch.testing.assert_close(lin(x).float(), F.linear(x, lin.weight, lin.bias).float(), rtol=tol, atol=tol)
            assert lin._packed_weights  # the inference path ran
            lin.load_state_dict({"weight": torch.ones(256, 384), "bias": torch.full((256,), 2.0)})  # copies in place
            got = lin(x[:, :1])
        want = x[:, :1].float().sum(-1, keepdim=True) + 2.0
        torch.testing.assert_close(got.float(), want.expand_as(got.float()), rtol=tol, atol=tol * 384)
        assert sorted(lin.state_dict()) == ["bias", "weight"]
        assert "_packed_weights" not in pickle.loads(pickle.dumps(lin)).__dict__
        assert "_packed_weights" not in copy.deepcopy(lin).__dict__
    assert Linear(4, 2)(torch.randn(1, 4)).requires_grad


def test_small_products_skip_the_prepacked_weight():
    """Below ``PREPACK_MIN_MACS`` a product's fixed cost outweighs the prepacked layout: float32 runs F.linear,
    bfloat16 a float32 product on a float32 copy of the weight (rebuilt when the weight changes) rounded once."""
    from torch.nn import functional as F

    from dvt_backends.torch.layers import Linear

    torch.manual_seed(0)
    lin = Linear(64, 192)
    x = torch.randn(1, 5, 64)  # 61,440 multiply-adds: a batch-1 product of the shipped model's first stage
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
        assert not getattr(lin, "_packed_weights", None)  # nothing laid out for oneDNN
        lin.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        want = F.linear(xb.float(), lin.weight.float(), lin.bias.float()).to(torch.bfloat16)
        assert torch.equal(lin(xb), want)
        assert lin(xb).dtype == torch.bfloat16
        lin.weight.mul_(2.0)  # in place: the float32 copy follows
        assert torch.equal(lin(xb), F.linear(xb.float(), lin.weight.float(), lin.bias.float()).to(torch.bfloat16))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_inference_paths_give_the_plain_operators_values(approximate):
    """The MLP with its GELU fused into the prepacked product and the patch embedding as a prepacked product
    give what the plain operators give (F.linear, GELU, the strided convolution) in float32."""
    from torch.nn import functional as F

    from dvt_backends.torch.layers import Mlp
    from dvt_backends.torch.tokenizers import PatchEmbed
    from dvt_core.model.zoo import get_spec

    torch.manual_seed(0)
    mlp = Mlp(384, 1536, 384, gelu_flavour="exact" if approximate == "none" else "tanh").eval()
    x = torch.randn(1, 50, 384)  # 29 M multiply-adds in fc1: the prepacked path
    with torch.no_grad():
        want = F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias), approximate=approximate),
                        mlp.fc2.weight, mlp.fc2.bias)
        torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)
        assert "weight" in mlp.fc1._packed_weights
    stage = get_spec("dvt_deit_small").stages[0]  # 32 x 32 patches, no overlap: the product form
    embed = PatchEmbed(stage, 3).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = F.conv2d(images, embed.proj.weight, embed.proj.bias, stride=stage.patch_stride).flatten(2).transpose(1, 2)
        torch.testing.assert_close(embed(images), want, rtol=1e-4, atol=1e-4)
        assert "proj" in embed._packed_weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factored_reused_logits_equal_the_resized_ones(monkeypatch, dtype):
    """A stage that hands its logits on takes the reused ones factored in CPU inference (``scale q k^T +
    left right^T`` as one product, never resizing along the queries); its exit logits and the logits it hands
    on equal those of the resized path (3x3 grid from 2x2: weighted taps, not copies)."""
    from dvt_backends.torch import layers

    model = small("dvt_deit_small", depth=2, grids=(2, 3, 4)).eval().to(dtype)
    x = images(model, n=3).to(dtype)
    calls = []
    factored = layers.Attention._factored_logits
    monkeypatch.setattr(layers.Attention, "_factored_logits",
                        lambda self, q, k, r: calls.append(q.shape) or factored(self, q, k, r))

    def middle_stage(factored_reuse: bool):
        if not factored_reuse:  # the resized path, as training and the last stage take it
            monkeypatch.setattr(model.stages[1], "_factored_reuse", lambda images, keep: False)
        with torch.no_grad():
            _, carry = model.run_stage(0, x)
            return model.run_stage(1, x, carry)

    logits, carry = middle_stage(True)
    assert len(calls) == 2  # both blocks of the middle stage, not the last stage (it runs the fused attention)
    want_logits, want_carry = middle_stage(False)
    assert len(calls) == 2
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(logits, want_logits, **tol)
    for got, want in zip(carry.relations, want_carry.relations):
        torch.testing.assert_close(got, want, **tol)
