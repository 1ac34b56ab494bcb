"""The torch side of ``dvt benchmark``: threads and device, and timm's static model as a reference beside our
own static backbone. The timing itself is written once over the runtime contract (``dvt_core.bench.benchmarking``).
"""
from __future__ import annotations

import torch

from dvt_core.errors import InputError

TIMM_MODELS = {"dvt_deit_tiny": "deit_tiny_patch16_224", "dvt_deit_small": "deit_small_patch16_224",
               "dvt_deit_base": "deit_base_patch16_224"}


def timm_model(name: str, num_classes: int, img_size: int):
    """timm's static model of the same width, or (None, why)."""
    timm_name = TIMM_MODELS.get(name)
    if timm_name is None:
        return None, f"timm has no model matching {name}"
    try:
        import timm
    except Exception as exc:  # timm needs torchvision, which may not import beside this torch
        return None, f"timm is not importable here ({type(exc).__name__}: {exc})".splitlines()[0]
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, img_size=img_size).eval(), timm_name


def references(model, static) -> dict:
    """``{"timm NAME": (call on an input batch, MACs per image)}`` when timm has the static model of ``model``
    and imports here; its MACs are our static backbone's (same architecture). In ``model``'s dtype and device."""
    spec = model.spec
    tm, name = timm_model(spec.name, spec.num_classes, spec.img_size)
    if tm is None:
        return {}
    p = next(model.parameters())
    tm = tm.to(p.device, p.dtype)

    def call(x):
        with torch.no_grad():
            return tm(x)
    return {f"timm {name}": (call, static.exit_macs[-1])}


def seed_weights(seed: int) -> None:
    """Random weights of the models built next are seeded (timing does not depend on them; outputs do)."""
    torch.manual_seed(seed)


def setup(device: str, threads) -> dict:
    """``--threads`` applied and ``--device`` checked (InputError when torch cannot use it); what was set."""
    if threads:
        torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise InputError(f"device {device!r} is not usable here ({str(exc).splitlines()[0]})") from None
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev)}
