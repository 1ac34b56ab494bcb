"""Numeric precision of inference: the names a user picks (``build(..., precision=)``, ``--precision``).

A backend that runs lower precision defines ``set_precision(model, precision) -> model``; one that does
not runs fp32 only and refuses the others with an InputError naming what it does support.
"""
from __future__ import annotations

from dvt_core.errors import InputError

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_PRECISION = "fp32"


def check_precision(precision) -> str:
    """``precision`` when it is one of :data:`PRECISIONS`; an InputError naming them otherwise."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def apply_precision(backend, model, precision):
    """The model at ``precision`` through ``backend.set_precision``; fp32 needs nothing from a backend,
    and a backend without ``set_precision`` refuses anything else (InputError)."""
    check_precision(precision)
    setter = getattr(backend, "set_precision", None)
    if setter is None:
        if precision == DEFAULT_PRECISION:
            return model
        raise InputError(f"the {backend.NAME} backend runs fp32 only here, not {precision}")
    return setter(model, precision)
