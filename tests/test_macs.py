"""Analytic MACs and parameter counts (dvt_core.model.macs) against the torch backend.

The reference is ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2 = MACs) on the model run
stage by stage exactly as early exit runs it (``DVT.run_stage``), and ``numel`` of each stage's
parameters. The formulas mirror the code, so the agreement is exact; the tests assert the 0.5% the
spec asks for and record the worst relative error seen (printed with ``pytest -s``).
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import dvt_core
from dvt_core.model import macs as M
from helpers import split_threshold

torch = pytest.importorskip("torch")
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

TOLERANCE = 0.005
aten = torch.ops.aten


def _embedding_bag_flops(weight, indices, *args, out_shape=None, **kwargs) -> int:
    """A gather and weighted sum: one multiply-accumulate per index per column of the table."""
    return 2 * int(np.prod(indices)) * weight[1]


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The fused CPU attention kernel, as its two products (q @ k.T, softmax @ v)."""
    b, h, s_q, d = query
    return 2 * b * h * s_q * key[2] * (d + value[3])


# FlopCounterMode leaves out these two kernels; what runs must still be counted
EXTRA_FLOPS = {aten._embedding_bag_forward_only: _embedding_bag_flops, aten._embedding_bag: _embedding_bag_flops,
               aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FLOPS)
WORST: dict[str, float] = {}  # test id -> worst relative error, printed at the end of the module

MODELS = [n for n in dvt_core.list_models() if not n.startswith("static_") and "fashion" not in n]
ABLATIONS = [(True, True), (True, False), (False, True), (False, False)]


def small_overrides(name: str, **extra) -> dict:
    """A tiny version of ``name`` (same family, tokenizer kind and number of exits)."""
    grids = (2, 3, 4) if dvt_core.get_spec(name).num_exits == 3 else (2, 4)
    kw = dict(img_size=64, grids=grids, depth=2, embed_dim=64, num_heads=2, token_dim=16)
    kw.update(extra)
    return kw


def measured(spec, batch: int = 1, seed: int = 0):
    """(cumulative FlopCounterMode MACs per exit, per image; numel of each stage's parameters)."""
    torch.manual_seed(seed)
    model = dvt_core.build(spec, backend="torch").eval()
    images = torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size)
    reuse, total, out = None, 0, []
    with torch.no_grad():
        for i in range(spec.num_exits):
            with flop_counter() as counter:
                _, reuse = model.run_stage(i, images, reuse)
            flops = counter.get_total_flops()
            assert flops % (2 * batch) == 0
            total += flops // (2 * batch)
            out.append(total)
    params = [sum(p.numel() for p in st.parameters()) for st in model.stages]
    return out, params


def check_macs(key: str, spec, batch: int = 1) -> None:
    got, params = measured(spec, batch)
    want = M.exit_macs(spec)
    assert len(want) == spec.num_exits
    errors = [abs(w - g) / g for w, g in zip(want, got)]
    WORST[key] = max(errors)
    assert max(errors) <= TOLERANCE, f"{key}: analytic {want} vs FlopCounterMode {got}"
    assert want == got, f"{key}: analytic {want} vs FlopCounterMode {got} (within tolerance, not exact)"
    assert [M.stage_params(spec, i) for i in range(spec.num_exits)] == params


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    if WORST:
        key = max(WORST, key=WORST.get)
        print(f"\n[test_macs] {len(WORST)} MAC checks, worst relative error {WORST[key]:.2e} ({key})")


# ---- breadth: every zoo model x every reuse ablation, small ------------------------------------------

@pytest.mark.parametrize("feature_reuse,relation_reuse", ABLATIONS)
@pytest.mark.parametrize("name", MODELS)
def test_exit_macs_match_flop_counter_small(name, feature_reuse, relation_reuse):
    spec = dvt_core.get_spec(name, **small_overrides(name), feature_reuse=feature_reuse,
                             relation_reuse=relation_reuse)
    check_macs(f"{name} small fr={feature_reuse} rr={relation_reuse}", spec)


@pytest.mark.parametrize("name", MODELS)
def test_exit_macs_match_flop_counter_native_widths(name):
    """Each model's own widths, heads and MLP ratio (depth 1, small image)."""
    n = dvt_core.get_spec(name).num_exits
    spec = dvt_core.get_spec(name, img_size=64, grids=(2, 3, 4)[:n] if n == 3 else (2, 4), depth=1)
    check_macs(f"{name} native widths", spec)


@pytest.mark.parametrize("name", dvt_core.list_models("fashion") + dvt_core.list_models("static_"))
def test_small_zoo_models_at_their_own_size(name):
    """The models the breadth test leaves out (28-pixel images, single-exit baselines), as registered."""
    check_macs(f"{name} native", dvt_core.get_spec(name))


def _transformer_tokens(spec):
    """The T2T-ViT-t variant: tokens-to-token with softmax attention instead of the Performer."""
    stages = tuple(dataclasses.replace(s, t2t=dataclasses.replace(s.t2t, token_type="transformer"))
                   for s in spec.stages)
    return dataclasses.replace(spec, stages=stages).validate()


@pytest.mark.parametrize("feature_reuse,relation_reuse", ABLATIONS)
def test_transformer_tokens_to_token(feature_reuse, relation_reuse):
    spec = dvt_core.get_spec("dvt_t2t_vit_12", **small_overrides("dvt_t2t_vit_12"),
                             feature_reuse=feature_reuse, relation_reuse=relation_reuse)
    check_macs(f"t2t transformer fr={feature_reuse} rr={relation_reuse}", _transformer_tokens(spec))


@pytest.mark.parametrize("name", ["dvt_t2t_vit_12", "dvt_deit_small"])
def test_every_other_override(name):
    """Widths the default overrides leave alone: reuse widths, expand, classes, channels, equal grids."""
    spec = dvt_core.get_spec(name, img_size=48, grids=(3, 3, 4), depth=2, embed_dim=48, num_heads=3,
                             token_dim=8, mlp_ratio=3.0, qkv_bias=True, num_classes=10, in_chans=1,
                             feature_reuse_dim=24, feature_reuse_hidden=40, relation_reuse_expand=2)
    check_macs(f"{name} other overrides", spec, batch=2)


def test_per_image_at_any_batch():
    spec = dvt_core.get_spec("dvt_t2t_vit_12", **small_overrides("dvt_t2t_vit_12"))
    assert measured(spec, batch=3)[0] == M.exit_macs(spec)


def test_true_early_exit_spends_what_exit_macs_says():
    """``DVT.adaptive`` keeps relations only while a later stage needs them and carries only the
    images that go on: its FlopCounterMode total equals the sum of the per-image exit MACs it reports."""
    spec = dvt_core.get_spec("dvt_t2t_vit_12", **small_overrides("dvt_t2t_vit_12"), num_classes=5)
    torch.manual_seed(0)
    model = dvt_core.build(spec, backend="torch").eval()
    images = torch.randn(8, spec.in_chans, spec.img_size, spec.img_size)
    with torch.no_grad():
        conf = [torch.softmax(o, -1).amax(-1) for o in model(images)]
    # about half leave at exit 0, the rest at 1; no confidence near a threshold
    thresholds = [split_threshold(conf[0].numpy(), 0.5), float(conf[1].min()) - 1e-3]
    with flop_counter() as counter:
        result = model.adaptive(images, thresholds)
    assert set(result.exit_index.tolist()) - {0} and 0 in result.exit_index.tolist()
    assert counter.get_total_flops() // 2 == int(result.macs.sum())


# ---- full size ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("feature_reuse,relation_reuse", [(True, True), (False, False)])
@pytest.mark.parametrize("name", ["dvt_t2t_vit_12", "dvt_deit_small"])
def test_exit_macs_match_flop_counter_full_size(name, feature_reuse, relation_reuse):
    """Full size, with both reuses and with none (the small tests cover each ablation separately)."""
    spec = dvt_core.get_spec(name, feature_reuse=feature_reuse, relation_reuse=relation_reuse)
    check_macs(f"{name} full fr={feature_reuse} rr={relation_reuse}", spec)


@pytest.mark.slow
def test_static_backbones_full_size():
    spec = dvt_core.get_spec("dvt_t2t_vit_12")
    for i in range(spec.num_exits):
        check_macs(f"static t2t_vit_12 exit {i}", dvt_core.static_spec(spec, i))


# ---- paper numbers and fixed figures ---------------------------------------------------------------

def test_paper_table1_t2t_vit_12():
    """Table 1 of the paper: T2T-ViT-12 costs 1.78 GMACs at 14x14 tokens and 0.47 G at 7x7."""
    spec = dvt_core.get_spec("dvt_t2t_vit_12")
    static14 = M.exit_macs(dvt_core.static_spec(spec, 2))
    static7 = M.exit_macs(dvt_core.static_spec(spec, 0))
    assert len(static14) == len(static7) == 1
    assert static14[0] == pytest.approx(1.78e9, rel=0.02)
    assert static7[0] == pytest.approx(0.47e9, rel=0.02)
    assert static7[0] == M.exit_macs(spec)[0]  # the first exit is the 7x7 static model


def test_full_size_figures():
    """The full-size figures, checked against FlopCounterMode by the slow tests, pinned here."""
    assert M.exit_macs("dvt_t2t_vit_12") == [467702400, 1448108400, 3464240592]
    assert M.exit_macs("dvt_deit_small") == [1142909952, 3646084728, 8814255624]
    assert M.exit_macs(dvt_core.static_spec(dvt_core.get_spec("dvt_t2t_vit_12"), 2)) == [1762638336]
    assert M.exit_params("dvt_t2t_vit_12") == [6989824, 14734334, 22461516]


def test_official_arithmetic_without_the_resize():
    """Leaving out the reuse resizes (upsample + pool in the official code, which counts them as
    nothing) gives the official DVT T2T-ViT-12 figures: 0.468 / 1.446 / 3.455 G (notes/performance.md)."""
    got = M.exit_macs("dvt_t2t_vit_12", count_resize=False)
    assert [round(m / 1e9, 3) for m in got] == [0.468, 1.446, 3.455]
    full = M.exit_macs("dvt_t2t_vit_12")
    assert got[0] == full[0] and all(g < f for g, f in zip(got[1:], full[1:]))
    none = dict(feature_reuse=False, relation_reuse=False)
    assert M.exit_macs("dvt_t2t_vit_12", count_resize=False, **none) == M.exit_macs("dvt_t2t_vit_12", **none)


OFFICIAL_VARIANTS = [n for n in MODELS if "fashion" not in n]


@pytest.mark.parametrize("name", OFFICIAL_VARIANTS)
def test_exit_macs_within_half_a_percent_of_the_official_count(name):
    """What runs (the reuse resize included, as gathers and weighted sums) costs at most 0.5 % more
    than the official count, which leaves the resize out."""
    got = M.exit_macs(name)
    official = M.exit_macs(name, count_resize=False)
    assert all(g >= o for g, o in zip(got, official))
    assert max(g / o - 1 for g, o in zip(got, official)) <= 0.005, (name, got, official)


def test_resize_taps_against_the_dense_matrix():
    """The resize costs the non-zero entries of the official resize matrix, per channel: 2.56 terms
    per new token for 7 -> 10, 2.47 for 10 -> 14 (4 at most), not the old grid's 50 or 101."""
    from dvt_core.model.resample import token_resize_matrix
    for old, new in [(7, 10), (10, 14), (7, 14)]:
        for mode in ("keep", "zero"):
            nnz = int(np.count_nonzero(token_resize_matrix(old, new, mode)))
            assert M.token_resize_macs(3, old, new, channels=5, class_token=mode) == 3 * nnz * 5
            assert nnz <= 4 * (new * new + 1)


def test_reuse_costs_what_it_adds():
    """Feature and relation reuse each add MACs to the later stages only, never to the first exit."""
    full = M.exit_macs("dvt_t2t_vit_12")
    none = M.exit_macs("dvt_t2t_vit_12", feature_reuse=False, relation_reuse=False)
    assert full[0] == none[0]
    assert all(f > n for f, n in zip(full[1:], none[1:]))
    spec = dvt_core.get_spec("dvt_t2t_vit_12")
    assert M.stage_macs(spec, 1) == (M.tokenizer_macs(spec.stages[1], 224, 3) + 12 * M.block_macs(spec.stages[1], 48)
                                     + M.feature_reuse_macs(spec, 1) + M.relation_reuse_macs(spec, 1) + 256 * 1000)


# ---- API ------------------------------------------------------------------------------------------

def test_api_forms():
    spec = dvt_core.get_spec("dvt_deit_tiny")
    assert dvt_core.exit_macs("dvt_deit_tiny") == M.exit_macs(spec)
    assert dvt_core.stage_macs(spec, 1) == M.stage_macs("dvt_deit_tiny", 1)
    assert dvt_core.stage_params(spec, 0) == M.stage_params(spec, 0)
    assert M.exit_macs("dvt_deit_tiny", num_classes=10) == M.exit_macs(dataclasses.replace(spec, num_classes=10))
    assert M.exit_params(spec) == list(np.cumsum([M.stage_params(spec, i) for i in range(3)]))
    with pytest.raises(dvt_core.SpecError):
        M.exit_macs("dvt_deit_tinyy")


def test_trainable_params_leave_out_frozen():
    """T2T stages hold two frozen Performer ``w`` and a fixed sinusoid ``pos_embed``; DeiT none."""
    torch.manual_seed(0)
    for name in ("dvt_t2t_vit_12", "dvt_deit_tiny"):
        spec = dvt_core.get_spec(name, **small_overrides(name))
        model = dvt_core.build(spec, backend="torch")
        for i, st in enumerate(model.stages):
            trainable = sum(p.numel() for p in st.parameters() if p.requires_grad)
            assert M.stage_params(spec, i, trainable_only=True) == trainable
        assert M.exit_params(spec, trainable_only=True)[-1] == sum(
            p.numel() for p in model.parameters() if p.requires_grad)


def test_macs_table():
    rows = dvt_core.macs_table("dvt_t2t_vit_12")
    assert [r["grid"] for r in rows] == ["7x7", "10x10", "14x14"]
    assert [r["tokens"] for r in rows] == [50, 101, 197]
    assert [r["exit_macs"] for r in rows] == M.exit_macs("dvt_t2t_vit_12")
    assert [r["stage_macs"] for r in rows] == [M.stage_macs("dvt_t2t_vit_12", i) for i in range(3)]
    assert [r["params"] for r in rows] == [M.stage_params("dvt_t2t_vit_12", i) for i in range(3)]
    assert rows[-1]["exit_params"] == sum(r["params"] for r in rows)
    assert {"name", "stage", "trainable_params"} <= set(rows[0])
    two = dvt_core.macs_table("dvt_vit_base", feature_reuse=False)
    assert len(two) == 2 and two[1]["exit_macs"] == M.exit_macs("dvt_vit_base", feature_reuse=False)[1]


def test_macs_module_imports_no_framework():
    code = ("import sys, dvt_core; dvt_core.exit_macs('dvt_t2t_vit_12'); dvt_core.macs_table('dvt_deit_small');"
            "bad = {'torch', 'mindspore'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
