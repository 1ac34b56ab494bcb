"""Serving a DVT over HTTP with per-stage batching (``dvt serve``).

:mod:`~dvt_core.serve.scheduler` (framework-free, the per-stage queues), :mod:`~dvt_core.serve.app`
(the ASGI app and its one request handler; Starlette, imported when an app is made),
:mod:`~dvt_core.serve.protocol` and :mod:`~dvt_core.serve.v2` (the Open Inference Protocol v2: parsing
and encoding, and the service's side) and :mod:`~dvt_core.serve.metrics` (Prometheus text); the load test
is :mod:`dvt_core.bench.loadtest` and :mod:`dvt_core.bench.hey`. Nothing here imports a web framework or a
model framework at module import.
"""
