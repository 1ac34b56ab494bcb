"""Measuring tools, above the library layers they measure: :mod:`~dvt_core.bench.benchmarking` (``dvt
benchmark``: early exit against the static backbone per runtime and precision, ratios in one run) and
:mod:`~dvt_core.bench.loadtest` (``dvt benchmark --serve``: the HTTP service under load). A framework is
reached only through the runtime registry."""
