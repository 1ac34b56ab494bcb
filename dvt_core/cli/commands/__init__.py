"""The ``dvt`` subcommands, one module each.

A subcommand module has ``HELP`` (one line for ``dvt --help``), ``add_arguments(parser)`` and
``run(args) -> int``. :mod:`dvt_core.cli.main` builds the parser from :data:`COMMANDS` and maps user errors
to status 2; the work itself is done by the library (``dvt_core``), which the modules only call.
"""
COMMANDS = ("demo", "predict", "evaluate", "calibrate", "flops", "convert", "export", "train", "adapt", "benchmark",
            "serve", "profile")
