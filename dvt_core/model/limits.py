"""The size limits of a spec: a model too large to build here is refused before anything is allocated."""
from __future__ import annotations

import math

from dvt_core.errors import SpecError
from dvt_core.schema import MAX_CLASSES, check_name, want_float, want_int

MAX_EXITS = 16
MAX_IMG_SIZE = 4096
MAX_CHANNELS = 16
MAX_WIDTH = 16384                 # embed_dim, token_dim
MAX_DEPTH = 256
MAX_HEADS = 1024
MAX_TOKENS = 16384                # tokens of one stage (a 128x128 grid): attention is N^2 per head
MAX_PARAMS = 2_000_000_000        # parameters of a whole cascade (8 GB of float32)


def _stage_params(st, reuse_in: int) -> int:
    """Parameters of one stage, roughly (weights of its blocks and tokenizer), for the size limit only."""
    c, hidden = st.embed_dim, int(st.embed_dim * st.mlp_ratio)
    block = 4 * c * c + 2 * c * hidden + reuse_in
    tokens = (st.grid * st.grid + 1) * c
    return st.depth * block + tokens


def check_spec_limits(spec) -> None:
    """SpecError when a spec describes a model too large to build here (widths, depth, tokens, parameters):
    refused before anything is allocated or computed."""
    where = spec.name
    if len(spec.stages) > MAX_EXITS:
        raise SpecError(f"{where}: {len(spec.stages)} exits (at most {MAX_EXITS})")
    check_name(spec.name, "spec name")
    for key, value, high in (("num_classes", spec.num_classes, MAX_CLASSES), ("img_size", spec.img_size, MAX_IMG_SIZE),
                             ("in_chans", spec.in_chans, MAX_CHANNELS)):
        want_int(value, f"{where}: {key}", 1, high, SpecError)
    for key in ("mean", "std"):
        for v in getattr(spec, key):
            want_float(v, f"{where}: {key}", error=SpecError)
    for v in spec.std:
        want_float(v, f"{where}: std", 0.0, low_open=True, error=SpecError)
    for key in ("feature_reuse_dim", "feature_reuse_hidden", "relation_reuse_expand"):
        want_int(getattr(spec, key), f"{where}: {key}", 1, MAX_WIDTH, SpecError)
    want_float(spec.drop_path_rate, f"{where}: drop_path_rate", 0.0, 1.0, high_open=True, error=SpecError)
    total = 0
    for i, st in enumerate(spec.stages):
        here = f"{where} stage {i}"
        want_int(st.embed_dim, f"{here}: embed_dim", 1, MAX_WIDTH, SpecError)
        want_int(st.depth, f"{here}: depth", 1, MAX_DEPTH, SpecError)
        want_int(st.num_heads, f"{here}: num_heads", 1, MAX_HEADS, SpecError)
        want_int(st.grid, f"{here}: grid", 1, int(math.isqrt(MAX_TOKENS)), SpecError)
        want_float(st.mlp_ratio, f"{here}: mlp_ratio", 0.0, 64.0, low_open=True, error=SpecError)
        want_float(st.ln_eps, f"{here}: ln_eps", 0.0, 1.0, low_open=True, error=SpecError)
        if st.t2t is not None:
            want_int(st.t2t.token_dim, f"{here}: token_dim", 1, MAX_WIDTH, SpecError)
            want_float(st.t2t.kernel_ratio, f"{here}: kernel_ratio", 0.0, 16.0, low_open=True, error=SpecError)
            for key in ("kernels", "strides"):
                for v in getattr(st.t2t, key):
                    want_int(v, f"{here}: t2t {key}", 1, MAX_IMG_SIZE, SpecError)
            for v in st.t2t.paddings:
                want_int(v, f"{here}: t2t paddings", 0, MAX_IMG_SIZE, SpecError)
        elif st.family == "vit":
            want_int(st.patch_kernel, f"{here}: patch_kernel", 1, MAX_IMG_SIZE, SpecError)
            want_int(st.patch_stride, f"{here}: patch_stride", 1, MAX_IMG_SIZE, SpecError)
            want_int(st.patch_padding, f"{here}: patch_padding", 0, MAX_IMG_SIZE, SpecError)
        total += _stage_params(st, spec.feature_reuse_hidden * spec.feature_reuse_dim)
    if total > MAX_PARAMS:
        raise SpecError(f"{where}: about {total:,} parameters; refused above {MAX_PARAMS:,} (a smaller embed_dim, "
                        "depth or grid)")
