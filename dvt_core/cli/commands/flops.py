"""``dvt flops``: MACs and parameters per stage and per exit."""
from __future__ import annotations

import json

from dvt_core.model.zoo import get_spec, list_models
from dvt_core.cli.commands._shared import parse_overrides
from dvt_core.errors import ArgumentError

HELP = "MACs and parameters per stage and per exit"


def add_arguments(parser) -> None:
    parser.add_argument("name", nargs="?", help="zoo model name")
    parser.add_argument("--list", nargs="?", const="", default=None, metavar="PATTERN",
                        help="list the zoo (PATTERN: a wildcard such as 'dvt_deit*', or a part of the name)")
    parser.add_argument("--override", "-O", action="append", metavar="KEY=VALUE")
    parser.add_argument("--backend", default="torch",
                        help="accepted as by every subcommand; MACs and parameters do not depend on it")
    parser.add_argument("--json", action="store_true",
                        help="JSON: the table's rows; with --list the names (`dvt flops --list --json` stays a plain "
                             "list of names)")


def _shipped() -> set:
    from dvt_core.checkpoint.registry import shipped_models
    from dvt_core.errors import DVTError

    try:
        return set(shipped_models())
    except DVTError:
        return set()


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


def run(args) -> int:
    from dvt_core.model.macs import macs_table

    from dvt_core.runtime.contract import RUNTIMES

    if args.backend not in RUNTIMES:
        raise ArgumentError(f"unknown backend {args.backend!r}; choose one of {', '.join(RUNTIMES)}")
    if args.list is not None or not args.name:
        if args.list is None:
            raise ArgumentError("name a model, or pass --list")
        names = list_models(args.list)
        if not names:
            raise ArgumentError(f"no model matches {args.list!r}; `dvt flops --list` lists them all")
        shipped = _shipped()
        if args.json:
            print(json.dumps(names))
        else:
            width = max(len(n) for n in names)
            print("\n".join(f"{n.ljust(width)}  shipped weights (--weights default)" if n in shipped else n
                            for n in names))
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
