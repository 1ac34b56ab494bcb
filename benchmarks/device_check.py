"""Checks that the torch backend runs on an accelerator and agrees with the CPU.

Usage: python benchmarks/device_check.py [--device cuda]. Prints the worst per-exit logit difference
between the device and the CPU for full-size models, and whether `adaptive` picks the same exits.
"""
import argparse
import time

import numpy as np
import torch

import dvt_core


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    dev = torch.device(args.device)
    print("device:", torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev)
    for name in ("dvt_t2t_vit_12", "dvt_deit_small"):
        torch.manual_seed(0)
        cpu = dvt_core.build(name).eval()
        acc = dvt_core.build(name).eval()
        acc.load_state_dict(cpu.state_dict())
        acc = acc.to(dev)
        x = torch.randn(args.batch, 3, 224, 224)
        with torch.no_grad():
            ref = cpu(x)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            out = acc(x.to(dev))
        worst = max(float((a.cpu() - b).abs().max()) for a, b in zip(out, ref))
        conf = torch.stack([o.softmax(-1).max(-1).values for o in ref]).numpy()
        thr = np.median(conf, axis=1)
        r_cpu = cpu.adaptive(x, thr)
        r_dev = acc.adaptive(x.to(dev), thr)
        same = bool((r_cpu.exit_index == r_dev.exit_index).all() and (r_cpu.prediction == r_dev.prediction).all())
        xb = torch.randn(64, 3, 224, 224, device=dev)
        with torch.no_grad():
            for _ in range(3):
                acc(xb)
            torch.cuda.synchronize() if dev.type == "cuda" else None
            t = time.perf_counter()
            for _ in range(10):
                acc(xb)
            torch.cuda.synchronize() if dev.type == "cuda" else None
        ips = 640 / (time.perf_counter() - t)
        print(f"{name}: worst |device - cpu| logit difference {worst:.2e}; adaptive same exits and predictions: "
              f"{same}; all-exit throughput {ips:.0f} images/s at batch 64 (fp32)")


if __name__ == "__main__":
    main()
