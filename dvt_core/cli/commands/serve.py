"""``dvt serve``: an HTTP service with per-stage batching (dvt_core.serve), on uvicorn."""
from __future__ import annotations

import sys

from dvt_core.errors import ArgumentError
from dvt_core.cli.commands._shared import (add_common_options, build_from_args, resolve_weights, model_meta,
                                           model_class_names, format_thresholds, parse_thresholds, choose_thresholds,
                                           early_spec, check_budget_option, parse_budget, escape_text)
from dvt_core.data.datasets import model_name

HELP = "serve a model over HTTP (POST /v1/predict; the Open Inference Protocol v2) with early exit batched per stage"


def add_arguments(parser) -> None:
    add_common_options(parser)
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--budget", type=parse_budget, default=None,
                   help="target average MACs per image: the calibrated operating point that fits (as dvt predict)")
    g.add_argument("--thresholds", default=None, help="comma-separated confidence thresholds, one per exit but the last (default: the checkpoint's)")
    parser.add_argument("--adapt-budget", action="store_true",
                        help="with --budget: move the thresholds at run time to hold that average MACs per image "
                             "(answers then follow the load's images, not dvt predict's fixed operating point)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: a free one; the URL is printed when ready)")
    parser.add_argument("--max-batch", type=int, default=32, help="most images in one run of a stage (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0,
                        help="longest an image waits in a stage's queue for a fuller batch (default 2 ms)")
    parser.add_argument("--queue-limit", type=int, default=256,
                        help="most images in the service at once; past it 503 with Retry-After (default 256)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="most images in one /v2 infer request (default: the queue limit); more get 413")
    parser.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body, MiB (default 8)")
    parser.add_argument("--max-connections", type=int, default=256,
                        help="most open connections and requests at once; past it 503 (default 256)")
    parser.add_argument("--request-timeout", type=float, default=30.0,
                        help="seconds a request waits for its answer before 504 (default 30)")
    parser.add_argument("--read-timeout", type=float, default=10.0,
                        help="seconds a client has to send its whole body before 408 (default 10)")


def _limits(args):
    from dvt_core.serve.app import ServeLimits

    if not 0 <= args.port <= 65535:
        raise ArgumentError(f"--port must be 0 to 65535, got {args.port}")
    if args.max_connections < 1:
        raise ArgumentError(f"--max-connections must be 1 or more, got {args.max_connections}")
    for flag, value in (("--request-timeout", args.request_timeout), ("--read-timeout", args.read_timeout)):
        if not value > 0:
            raise ArgumentError(f"{flag} must be above 0 seconds, got {value:g}")
    return ServeLimits(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_limit=args.queue_limit,
                       max_images=args.max_images,
                       max_body_mb=args.max_body_mb, request_timeout_s=args.request_timeout,
                       read_timeout_s=args.read_timeout).check()


def _needs_serve_extra() -> None:
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ArgumentError(f"dvt serve needs {' and '.join(missing)}: pip install 'dvt[serve]'")


def run(args) -> int:
    from dvt_core.serve.app import PredictService, run_server

    limits = _limits(args)  # the usual mistakes, before the model is built
    if args.adapt_budget and args.budget is None:
        raise ArgumentError("--adapt-budget needs --budget MACS (the average to hold)")
    _needs_serve_extra()
    early = early_spec(args)
    if early is not None:
        if args.thresholds is not None:
            parse_thresholds(args.thresholds, early.num_exits)
        check_budget_option(args.budget, early)
    model = build_from_args(args, resolve_weights(args))
    spec, meta = model.spec, model_meta(model)
    source = "the shipped weights" if args.weights in (None, "default") else str(args.weights)
    thresholds, how = choose_thresholds(args, spec, meta, source)
    service = PredictService(model, thresholds, limits, classes=model_class_names(meta, spec.num_classes),
                             mac_budget=args.budget, adapt_budget=args.adapt_budget)

    def announce(url: str) -> None:
        print(f"dvt serve: {escape_text(model_name(meta, spec.name))} ({args.backend}) on {url}  thresholds {format_thresholds(thresholds)} ({how}); "
              f"POST {url}/v1/predict, POST {url}/v2/models/{service.name}/infer", flush=True)

    run_server(service, args.host, args.port, max_connections=args.max_connections, announce=announce)
    print("dvt serve: stopped", file=sys.stderr, flush=True)
    return 0
