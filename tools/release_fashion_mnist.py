"""Bake calibration and evaluation into the shipped Fashion-MNIST weights, and write the registry.

Run after training (README, "Training the shipped models"):

    python tools/release_fashion_mnist.py [--weights-dir weights]

For the DVT and each static baseline it computes the per-exit probabilities on the held-out part of
the training set (the images training never saw) and on the test set. Thresholds for the official
59 budgets are found on the held-out part only; the default operating point is the cheapest budget
whose held-out accuracy reaches the full-grid static baseline's. Everything is stored in each
file's metadata (rewritten atomically), with accuracies on a fixed 1,000-image test subset that
ships in dvt_core/assets for the tests and the demo. Finally weights/registry.yaml gets each file's
SHA-256.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dvt_core  # noqa: E402
from dvt_core.data import sources as data
from dvt_core.runtime import evaluation
from dvt_core.runtime import operating_point
from dvt_core.runtime import policy  # noqa: E402
from dvt_core.checkpoint.files import read_checkpoint, write_checkpoint  # noqa: E402
from dvt_core.training.config import TrainConfig  # noqa: E402
from dvt_core.checkpoint.registry import sha256  # noqa: E402

DVT = "dvt_fashion_mnist"
STATICS = ["static_fashion_mnist_2x2", "static_fashion_mnist_4x4", "static_fashion_mnist_7x7"]
SUBSET = ROOT / "dvt_core" / "assets" / "fashion_mnist_test_subset.npz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights-dir", default=str(ROOT / "weights"))
    ap.add_argument("--subset-per-class", type=int, default=100)
    args = ap.parse_args()
    wdir = Path(args.weights_dir)

    x_train, y_train = data.load_fashion_mnist("train")
    x_test, y_test = data.load_fashion_mnist("test")

    idx = data.subset_indices(y_test, args.subset_per_class, seed=0)
    SUBSET.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(SUBSET, images=x_test[idx], labels=y_test[idx], indices=idx)
    print(f"wrote {SUBSET} ({len(idx)} test images)")
    sub_x, sub_y = x_test[idx], y_test[idx]

    results = {}
    for name in [DVT] + STATICS:
        path = wdir / f"{name}.safetensors"
        ckpt = read_checkpoint(path)
        model = dvt_core.build(name, weights=path)
        cfg = TrainConfig.from_dict(ckpt.meta.get("train", {}))
        _, hold = data.split_holdout(len(x_train), cfg.holdout, cfg.seed)
        p_hold = evaluation.exit_probs(model, x_train[hold], progress=True, desc=f"{name} holdout")
        p_test = evaluation.exit_probs(model, x_test, progress=True, desc=f"{name} test")
        p_sub = evaluation.exit_probs(model, sub_x)
        results[name] = dict(path=path, ckpt=ckpt, hold=p_hold, y_hold=y_train[hold], test=p_test, sub=p_sub)

    static_full = results[STATICS[-1]]
    target = float(policy.anytime_accuracy(static_full["hold"], static_full["y_hold"])[-1])

    for name, r in results.items():
        spec = dvt_core.get_spec(name)
        costs = dvt_core.exit_macs(spec)
        meta = dict(r["ckpt"].meta)
        meta.update({
            "dataset": "fashion-mnist",
            "classes": list(data.FASHION_MNIST_CLASSES),
            "exit_macs": costs,
            "holdout_anytime_accuracy": policy.anytime_accuracy(r["hold"], r["y_hold"]).tolist(),
            "test_anytime_accuracy": policy.anytime_accuracy(r["test"], y_test).tolist(),
            "subset": {"file": "dvt_core/assets/" + SUBSET.name, "images": int(len(sub_y)),
                       "anytime_accuracy": policy.anytime_accuracy(r["sub"], sub_y).tolist()},
        })
        if spec.num_exits > 1:
            budgets = operating_point.budgets_table(r["hold"], r["y_hold"], costs, r["test"], y_test)
            default = operating_point.default_operating_point(
                budgets, target, "cheapest budget whose held-out accuracy reaches static_fashion_mnist_7x7's")
            sub_acc, sub_macs = policy.evaluate(r["sub"], sub_y, np.float32(default["thresholds"]), costs)
            meta = operating_point.calibrated_meta(
                meta, spec, default["thresholds"], budgets=budgets, keep_budgets=False,
                default_budget=default["budget"],
                default_operating_point={k: default[k] for k in ("rule", "holdout_target_accuracy", "holdout_accuracy",
                                                                 "holdout_macs", "test_accuracy", "test_macs")},
                subset_adaptive={"accuracy": float(sub_acc), "mean_macs": float(sub_macs)})
            print(f"{name}: default budget {default['budget']}: test {default['test_accuracy']:.2f}% at "
                  f"{default['test_macs'] / 1e6:.2f} MMACs (static 7x7 test "
                  f"{policy.anytime_accuracy(static_full['test'], y_test)[-1]:.2f}% at {dvt_core.exit_macs(STATICS[-1])[-1] / 1e6:.2f} MMACs)")
        state = r["ckpt"].canonical_state(spec.num_exits)
        write_checkpoint(r["path"], state, meta, fmt="safetensors", force=True)
        print(f"updated {r['path']}")

    lines = ["# Weights this project ships and the checkpoints it knows.",
             "# shipped: `dvt_core.build(name, weights=\"default\")` loads these; the SHA-256 is checked.",
             "shipped:"]
    for name in [DVT] + STATICS:
        p = wdir / f"{name}.safetensors"
        lines += [f"  {name}:", f"    file: {p.name}", f"    sha256: {sha256(p)}",
                  "    dataset: fashion-mnist"]
    lines += [
        "# The authors' DVT release (ImageNet, torch pickles `*.pth.tar`; links in their repository's README).",
        "# Not shipped: download them and load with build(arch, weights=path) or `dvt convert SRC DST --arch ARCH`.",
        "official:",
        "  - {model: DVT_T2t_vit_12, arch: dvt_t2t_vit_12, exits: \"7x7-10x10-14x14\"}",
        "  - {model: DVT_T2t_vit_14, arch: dvt_t2t_vit_14, exits: \"7x7-10x10-14x14\"}",
        "  - {model: DVT_Deit_small, arch: dvt_deit_small, exits: \"7x7-10x10-14x14\"}",
    ]
    (wdir / "registry.yaml").write_text("\n".join(lines) + "\n")
    print(f"wrote {wdir / 'registry.yaml'}")


if __name__ == "__main__":
    main()
