"""Helpers the test modules share (a test module never imports another test module)."""
from __future__ import annotations

import numpy as np

# The small cascade every zoo model is shrunk to: three increasing token grids on 32-pixel images, two
# blocks of two heads (dvt_vit_base has two exits and takes the first and last grid).
SMALL = dict(img_size=32, grids=(2, 3, 4), depth=2, embed_dim=32, num_heads=2, num_classes=10)
SMALL_T2T = dict(SMALL, token_dim=16)


def small_overrides(name: str) -> dict:
    import dvt_core

    ov = dict(SMALL_T2T if "t2t" in name else SMALL)
    exits = dvt_core.get_spec(name).num_exits
    if exits != len(ov["grids"]):
        g = ov["grids"]
        ov["grids"] = (g[0],) + g[len(g) - exits + 1:]
    return ov


def random_images(spec, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, spec.in_chans, spec.img_size, spec.img_size)).astype(np.float32)
