"""What each ``dvt`` subcommand does. The parser lives in :mod:`dvt_core.cli`."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import data as dvt_data
from .cli import UserError, emit_json, parse_overrides
from .zoo import get_spec, list_models


# ---- shared helpers --------------------------------------------------------------------------------

def load_dataset(name: str, split: str, spec):
    """(uint8 images, int64 labels, class names) of ``fashion-mnist`` or an image folder.

    ``split="holdout"`` is the part of the training set kept out of training (seeded as in training).
    """
    if name.lower().replace("_", "-") == "fashion-mnist":
        if split == "holdout":
            x, y = dvt_data.load_fashion_mnist("train")
            _, hold = dvt_data.split_holdout(len(x), holdout_size(spec), 0)
            return x[hold], y[hold], list(dvt_data.FASHION_MNIST_CLASSES)
        x, y = dvt_data.load_fashion_mnist(split)
        return x, y, list(dvt_data.FASHION_MNIST_CLASSES)
    root = Path(name)
    if not root.exists():
        raise UserError(f"unknown dataset {name!r}: use fashion-mnist or a folder with one sub-folder per class")
    x, y, classes = dvt_data.load_image_folder(root, img_size=spec.img_size, channels=spec.in_chans)
    return x, y, classes


def holdout_size(spec) -> int:
    from .training import TrainConfig

    return TrainConfig().holdout


def build_from_args(args, weights=None):
    """The model named by --model/--weights/--override for --backend, on --device."""
    from .builder import build

    overrides = parse_overrides(getattr(args, "override", None))
    weights = weights if weights is not None else getattr(args, "weights", None)
    if args.model is None and weights in (None, "default"):
        raise UserError("name a model with --model (see `dvt flops --list`)")
    model = build(args.model, backend=args.backend, weights=weights, **overrides)
    return to_device(model, args.backend, args.device)


def to_device(model, backend: str, device):
    if device is None:
        return model
    if backend == "torch":
        import torch

        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise UserError(f"unknown torch device {device!r} ({exc})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but torch sees no CUDA device")
        return model.to(dev)
    import mindspore as ms

    target = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU", "ascend": "Ascend", "npu": "Ascend"}.get(
        str(device).split(":")[0].lower())
    if target is None:
        raise UserError(f"unknown MindSpore device {device!r}; use cpu, gpu or ascend")
    ms.set_context(device_target=target)
    return model


# ---- flops -------------------------------------------------------------------------------------------

def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


def cmd_flops(args) -> int:
    from .macs import macs_table

    if args.list or not args.name:
        if not args.list and not args.name:
            raise UserError("name a model, or pass --list")
        names = list_models()
        if args.json:
            print(json.dumps(names))
        else:
            print("\n".join(names))
        return 0
    rows = macs_table(args.name, **parse_overrides(args.override))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    spec = get_spec(args.name, **parse_overrides(args.override))
    print(f"{spec.name}: {spec.num_exits} exit(s), {spec.img_size}x{spec.img_size}x{spec.in_chans} input, "
          f"feature reuse {'on' if spec.feature_reuse else 'off'}, relation reuse "
          f"{'on' if spec.relation_reuse else 'off'}")
    header = ["exit", "grid", "tokens", "stage MACs", "exit MACs", "stage params", "exit params"]
    table = [[str(r["stage"] + 1), r["grid"], str(r["tokens"]), _human(r["stage_macs"]),
              _human(r["exit_macs"]), _human(r["params"]), _human(r["exit_params"])] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for t in table:
        print("  ".join(c.rjust(w) for c, w in zip(t, widths)))
    return 0


# ---- convert -----------------------------------------------------------------------------------------

def cmd_convert(args) -> int:
    from .convert import convert

    out = convert(args.src, args.dst, arch=args.arch, to=args.to, force=args.force,
                  overrides=parse_overrides(args.override))
    print(f"wrote {out['path']} ({out['format']}, {out['tensors']} tensors, arch {out['arch']})")
    return 0


# ---- train -------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from .training import TrainConfig

    if args.model is None:
        raise UserError("name a model to train with --model")
    if args.backend != "torch":
        raise UserError("`dvt train` runs on the torch backend; fine-tune in MindSpore with "
                        "backends.mindspore.train_step (see README)")
    spec = get_spec(args.model, **parse_overrides(args.override))
    cfg = TrainConfig()
    for field, value in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                         ("weight_decay", args.weight_decay), ("warmup_epochs", args.warmup_epochs),
                         ("holdout", args.holdout), ("seed", args.seed), ("max_steps", args.max_steps)):
        if value is not None:
            setattr(cfg, field, value)
    if args.no_augment:
        cfg.augment = False
    images, labels, classes = load_dataset(args.dataset, "train", spec)
    if labels.max() >= spec.num_classes:
        raise UserError(f"{args.dataset} has {labels.max() + 1} classes but {spec.name} predicts "
                        f"{spec.num_classes}; pass -O num_classes={labels.max() + 1}")
    from backends.torch.train import train

    t0 = time.time()
    path = train(spec, images, labels, cfg, args.out, device=args.device, resume=args.resume,
                 progress=not args.no_progress, extra_meta={"classes": classes, "dataset": args.dataset})
    print(f"wrote {path} in {time.time() - t0:.0f} s")
    return 0
