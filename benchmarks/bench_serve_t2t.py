"""Serving where the arithmetic dominates: DVT T2T-ViT-12 (random weights) behind `dvt serve`, adaptive
against every stage, many images per `/v2` request, driven by `hey` on 127.0.0.1.

    python benchmarks/bench_serve_t2t.py [--images 48] [--concurrency 8 16] [--threads 1] [--json F]

Thresholds are placed between the images' own confidences so that 60 / 25 / 15 % of the noise images
leave at exits 1 / 2 / 3 (no image sits on a threshold). Each server gets the images as one binary UINT8
tensor per request; the gain measured (adaptive img/s over every-stage img/s) is set against the gain the
MACs predict (every-stage MACs over the adaptive service's average MACs).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

import dvt_core
from dvt_core.checkpoint.files import write_checkpoint
from dvt_core.runtime import policy
from dvt_core.runtime.contract import backend_of
from dvt_core.bench import hey, loadtest


def split_thresholds(conf: np.ndarray, shares=(0.6, 0.25)) -> list:
    """Thresholds sending ``shares`` of the images out at exits 1 and 2, each halfway between two
    neighbouring confidences (``conf``: (exits, N))."""
    n, t, alive = conf.shape[1], [], np.arange(conf.shape[1])
    for i, share in enumerate(shares):
        c = np.sort(conf[i, alive])[::-1]
        k = int(round(share * n))
        t.append(float((c[k - 1] + c[k]) / 2))
        alive = alive[conf[i, alive] < t[-1]]
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48, help="noise images, all sent in each request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--threads", type=int, default=1, help="each server's CPU threads (OMP_NUM_THREADS)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = dvt_core.build("dvt_t2t_vit_12")  # random weights: the arithmetic is what is measured
    spec = model.spec
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, spec.img_size, spec.img_size, 3), dtype=np.uint8)
    from dvt_core.data.sources import normalize

    logits = backend_of(model).forward_numpy(model, normalize(images, spec.mean, spec.std))
    conf = policy.confidence(policy.softmax(np.stack(logits)))
    t = split_thresholds(conf)
    macs = np.asarray(model.exit_macs, dtype=np.float64)
    report = {"model": spec.name, "images": args.images, "thresholds": t, "threads": args.threads, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "t2t12_random.safetensors"
        write_checkpoint(weights, backend_of(model).model_state(model), {"model": spec.name})
        body, head = hey.v2_binary_body(images)
        common = ["--model", spec.name, "--weights", str(weights), "--max-batch", "16", "--max-wait-ms", "5",
                  "--max-body-mb", "64", "--queue-limit", "4096", "--request-timeout", "600"]
        variants = {"adaptive": [*common, "--thresholds", f"{t[0]},{t[1]}"],
                    "every_stage": [*common, "--thresholds", "1e8,1e8"]}
        with loadtest.launch(variants["adaptive"], threads=args.threads) as (a_url, _), \
                loadtest.launch(variants["every_stage"], threads=args.threads) as (e_url, _):
            path = f"/v2/models/{spec.name}/infer"
            for c in args.concurrency:
                row = {"concurrency": c}
                for name, url in (("adaptive", a_url), ("every_stage", e_url)):
                    res = hey.run_hey(url, path, body, c, 2 * c, {"Inference-Header-Content-Length": head}, 600,
                                      request_timeout_s=300)
                    row[name] = {**res, "img_s": res["requests_per_s"] * args.images}
                    print(c, name, f"{row[name]['img_s']:.1f} img/s", res["statuses"], flush=True)
                report["rows"].append(row)
    exits = np.argmax(np.vstack([conf[:-1] >= np.asarray(t)[:, None], np.ones((1, conf.shape[1]), bool)]), axis=0)
    adaptive_macs = float(macs[exits].mean())
    report["exit_shares"] = np.bincount(exits, minlength=3).tolist()
    report["mac_predicted_gain"] = macs[-1] / adaptive_macs
    for row in report["rows"]:
        gain = row["adaptive"]["img_s"] / row["every_stage"]["img_s"]
        row["gain"], row["share_of_prediction"] = gain, gain / report["mac_predicted_gain"]
        print(f"c={row['concurrency']}: adaptive over every stage {gain:.2f}x, MAC prediction "
              f"{report['mac_predicted_gain']:.2f}x ({row['share_of_prediction']:.2f} of it)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
