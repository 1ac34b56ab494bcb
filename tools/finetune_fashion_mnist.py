"""Transfer on real images: a small DVT trained on Fashion-MNIST classes 0-4, fine-tuned with ``--init`` on
classes 5-9, against the same model trained from scratch on classes 5-9 with the same budget.

    python tools/finetune_fashion_mnist.py [--out runs/finetune] [--per-class 1000] [--epochs 8]

Classes 5-9 (sandal, shirt, sneaker, bag, ankle boot) are numbered 0-4 in the second task. Both runs of
the second task see the same ``--per-class`` training images per class (a subset: transfer matters
most when data is scarce), the same epochs, batches and seed; each is calibrated on its own held-out
tenth and evaluated on the 5,000 test images of classes 5-9: accuracy at every exit and at the default
operating point stored by training, with the average MACs it spends. Prints a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dvt_core  # noqa: E402
from dvt_core.data import sources as data
from dvt_core.runtime import evaluation
from dvt_core.runtime import policy  # noqa: E402
from dvt_core.checkpoint.files import read_checkpoint  # noqa: E402
from dvt_core.training.config import TrainConfig  # noqa: E402

MODEL = "dvt_fashion_mnist"
SMALL = dict(depth=2, embed_dim=32, num_heads=2, num_classes=5)


def pick(x, y, classes, per_class=None, seed=0):
    keep = np.isin(y, classes)
    x, y = x[keep], (y[keep] - min(classes)).astype(np.int64)
    if per_class:
        idx = data.subset_indices(y, per_class, seed=seed)
        x, y = x[idx], y[idx]
    return x, y


def evaluate(path, x, y):
    model = dvt_core.build(weights=path)
    meta = read_checkpoint(path).meta
    costs = dvt_core.exit_macs(model.spec)
    probs = evaluation.exit_probs(model, x)
    acc, macs = policy.evaluate(probs, y, np.float32(meta["thresholds"]), costs)
    return {"exit_accuracy": [round(float(a), 2) for a in policy.anytime_accuracy(probs, y)],
            "exit_macs": [int(c) for c in costs], "default_accuracy": round(float(acc), 2),
            "default_mean_macs": round(float(macs)), "train_seconds": meta["train_seconds"],
            "reinitialised": (meta.get("init") or {}).get("reinitialised")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/finetune")
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--pretrain-epochs", type=int, default=5)
    args = ap.parse_args()
    out = Path(args.out)
    from dvt_backends.torch.train import train

    spec = dvt_core.get_spec(MODEL, **SMALL)
    x_train, y_train = data.load_fashion_mnist("train")
    x_test, y_test = data.load_fashion_mnist("test")
    xa, ya = pick(x_train, y_train, [0, 1, 2, 3, 4])
    xb, yb = pick(x_train, y_train, [5, 6, 7, 8, 9], args.per_class)
    xt, yt = pick(x_test, y_test, [5, 6, 7, 8, 9])

    t0 = time.time()
    base = TrainConfig(epochs=args.pretrain_epochs, batch_size=64, lr=2e-3, warmup_epochs=1.0, holdout=0.1)
    src = train(spec, xa, ya, base, out / "classes0-4", progress=False)
    cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=1e-3, warmup_epochs=1.0, holdout=0.1)
    tuned = train(spec, xb, yb, cfg, out / "finetuned", progress=False, init=src)
    scratch = train(spec, xb, yb, cfg, out / "scratch", progress=False)
    summary = {"model": MODEL, "overrides": SMALL, "pretrain_images": int(len(ya)), "task_images": int(len(yb)),
               "test_images": int(len(yt)), "epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs,
               "fine_tuned": evaluate(tuned, xt, yt), "from_scratch": evaluate(scratch, xt, yt),
               "wall_seconds": round(time.time() - t0)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
