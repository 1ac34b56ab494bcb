"""The numbers both backends build every model with: initialisation and the stochastic-depth schedule.

Initialisation (timm's ViT recipe, as the official DVT code uses it):

* every linear layer: weight ~ N(0, ``INIT_STD``) truncated to ``[-TRUNC_BOUND, TRUNC_BOUND]`` (absolute
  bounds, as timm's ``trunc_normal_``), bias zero;
* every LayerNorm: weight one, bias zero;
* the class token and a learned position table: the same truncated normal; a sinusoid position table
  is fixed (``dvt_core.model.specs.sinusoid_position_table``);
* convolutions (patch embedding, relation-reuse mixing): torch's default (kaiming-uniform with
  ``a = sqrt(5)``, bias uniform in ``+-1/sqrt(fan_in)``);
* the Performer's random features: a (semi-)orthogonal matrix times :func:`performer_feature_gain`,
  frozen.
"""
from __future__ import annotations

import math

INIT_STD = 0.02
TRUNC_BOUND = 2.0


def drop_path_rates(spec, index: int) -> list[float]:
    """Stochastic-depth probability of each block of stage ``index``: linearly increasing from 0 to
    ``spec.drop_path_rate`` over the stage's blocks (each exit is a network of its own)."""
    depth = spec.stages[index].depth
    rate = float(spec.drop_path_rate)
    if depth == 1:
        return [0.0]
    step = rate / (depth - 1)
    return [j * step for j in range(depth - 1)] + [rate]  # numpy.linspace's values, bit for bit


def performer_feature_gain(t2t) -> float:
    """Scale of the Performer's orthogonal random features: ``sqrt(m)`` for ``m`` features."""
    return math.sqrt(t2t.performer_features)
