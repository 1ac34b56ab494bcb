"""The reuse resize as gathers and weighted sums against the dense matrix product it replaced.

    python benchmarks/bench_resize.py [--model dvt_t2t_vit_12] [--batches 1 64] [--repeats 5]

For every stage with reuse: the feature resize (depth x B sequences of reuse_dim channels) and the
relation resize (both token axes of heads x depth maps), timed interleaved, best of ``--repeats``;
dense = ``token_resize_matrix`` applied with ``torch.matmul`` (the earlier implementation), taps =
``TokenResize`` (``embedding_bag`` over ``token_resize_taps``). Also checks they agree.
"""
from __future__ import annotations

import argparse
import time

import torch

import dvt_core
from dvt_core.model.macs import token_resize_macs
from dvt_core.model.resample import token_resize_matrix
from dvt_backends.torch.layers import TokenResize


def best(fn, repeats):
    fn()
    t_best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        t_best = min(t_best, time.perf_counter() - t)
    return t_best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dvt_t2t_vit_12")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    spec = dvt_core.get_spec(args.model)
    print(f"{args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for i in range(1, spec.num_exits):
        plan = spec.reuse_plan(i)
        prev, st = spec.stages[i - 1], spec.stages[i]
        n, big = prev.num_tokens, st.num_tokens
        for b in args.batches:
            cases = []
            if plan.feature:
                f = torch.randn(st.depth, b, n, plan.feature.out_dim)
                m = torch.from_numpy(token_resize_matrix(plan.feature.old_grid, plan.feature.new_grid, "zero"))
                tr = TokenResize(plan.feature.old_grid, plan.feature.new_grid, "zero")
                dense_macs = st.depth * b * big * n * plan.feature.out_dim
                cases.append(("features", lambda: torch.matmul(m, f), lambda: tr(f), dense_macs,
                              b * token_resize_macs(st.depth, plan.feature.old_grid, plan.feature.new_grid,
                                                    plan.feature.out_dim, "zero")))
            if plan.relation:
                c = plan.relation.out_channels
                r = torch.randn(b, c, n, n)
                mk = torch.from_numpy(token_resize_matrix(plan.relation.old_grid, plan.relation.new_grid, "keep"))
                tk = TokenResize(plan.relation.old_grid, plan.relation.new_grid, "keep")
                dense_macs = b * c * (n * n * big + big * n * big)
                cases.append(("relations", lambda: torch.matmul(mk, torch.matmul(r, mk.t())),
                              lambda: tk(tk(r).transpose(-2, -1)).transpose(-2, -1), dense_macs,
                              b * (token_resize_macs(c, plan.relation.old_grid, plan.relation.new_grid, n)
                                   + token_resize_macs(c, plan.relation.old_grid, plan.relation.new_grid, big))))
            for name, dense, taps, dm, tm in cases:
                err = float((dense() - taps()).abs().max())
                t_d, t_t = float("inf"), float("inf")
                for _ in range(args.repeats):  # interleaved
                    t_d = min(t_d, best(dense, 1))
                    t_t = min(t_t, best(taps, 1))
                print(f"stage {i + 1} {name:<9} batch {b:3d}: dense {t_d * 1e3:8.2f} ms ({dm / 1e6:9.1f} M MACs), "
                      f"taps {t_t * 1e3:8.2f} ms ({tm / 1e6:7.2f} M MACs): {t_d / t_t:5.1f}x faster; max diff {err:.1e}")


if __name__ == "__main__":
    main()
