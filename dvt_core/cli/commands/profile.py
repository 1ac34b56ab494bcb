"""``dvt profile``: measure each stage's time inside the cascade on this machine and store it with the weights
(``cost_profile``), so that a budget can be given in seconds (``calibrate --latency-budget``)."""
from __future__ import annotations

import sys

from dvt_core.errors import ArgumentError
from dvt_core.cli.commands._shared import (show_progress, add_common_options, add_force_option, check_outputs, emit_json,
                                           escape_text, parse_overrides)
from dvt_core.checkpoint.metadata import MAX_PROFILE_BATCHES
from dvt_core.schema import MAX_BENCH_BATCH, number

HELP = "measure each stage's time inside the cascade on this machine and store it (cost_profile) with the weights"


def add_arguments(parser) -> None:
    add_common_options(parser)
    parser.add_argument("--threads", type=number("int", 1, 4096), default=None,
                        help="CPU threads the runtime runs with (recorded with the profile; default: its own)")
    parser.add_argument("--batch-sizes", type=number("int", 1, MAX_BENCH_BATCH), nargs="+", default=[1, 64],
                        metavar="B", help="batch sizes to measure (default 1 64)")
    parser.add_argument("--images", type=number("int", 1, 1 << 16), default=64,
                        help="images timed at each batch size (at least one batch; default 64)")
    parser.add_argument("--repeats", type=number("int", 1, 1000), default=3, help="timed rounds (the best is kept)")
    parser.add_argument("--warmup", type=number("int", 0, 1000), default=1, help="untimed rounds first")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="checkpoint to write with the profile (default: none; the input is rewritten only "
                             "with --force, an export folder's dvt.json too)")
    add_force_option(parser)
    parser.add_argument("--json", default=None, metavar="F", help="write the profile as JSON here ('-' for stdout)")


def run(args) -> int:
    from dvt_core.bench.profiling import profile_weights

    if len(set(args.batch_sizes)) > MAX_PROFILE_BATCHES:
        raise ArgumentError(f"--batch-sizes: at most {MAX_PROFILE_BATCHES} batch sizes")
    check_outputs(args, args.json)
    result = profile_weights(args.weights, model=args.model, backend=args.backend, precision=args.precision,
                             threads=args.threads, batch_sizes=args.batch_sizes, images=args.images,
                             repeats=args.repeats, warmup=args.warmup, out=args.out, force=args.force,
                             progress=show_progress(), overrides=parse_overrides(args.override), device=args.device,
                             sha256=args.sha256, allow_lossy_cast=args.allow_lossy_cast,
                             trust_native_code=args.trust_native_code)
    out = sys.stderr if args.json == "-" else sys.stdout
    p, m = result["profile"], result["profile"]["machine"]
    print(f"{escape_text(m['cpu'])} ({'AMX' if m['amx'] else 'no AMX'}), {m['cores']} cores, "
          f"{p['threads'] or 'default'} threads; {p['runtime']} {p['precision']}; {result['images']}", file=out)
    print(f"  {'batch':>5}  {'ms/img per stage, in the cascade':34}  {'... cache warm (exit there before)':34}  "
          f"call overhead  static ms/img", file=out)
    for row in p["batches"]:
        stages = " / ".join(f"{ms:.3f}" for ms in row["stage_ms"])
        hot = " / ".join(f"{ms:.3f}" for ms in row.get("stage_hot_ms") or ()) or "-"
        static = f"{row['static_ms']:.3f}" if row.get("static_ms") is not None else "-"
        print(f"  {row['batch']:>5}  {stages:34}  {hot:34}  {row['overhead_ms']:13.3f}  {static}", file=out)
    if result["exit_shares"] is not None:
        shares = " / ".join(f"{s:.0%}" for s in result["exit_shares"])
        print(f"at the stored operating point (exits taken {shares} on these images):", file=out)
    for line in result["payoff"]:
        print(f"  {line}", file=out)
    print(f"wrote {escape_text(result['written'])}", file=out)
    emit_json(p, args.json, force=args.force)
    return 0
