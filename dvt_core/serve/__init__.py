"""Serving a DVT over HTTP with per-stage batching (``dvt serve``).

:mod:`~dvt_core.serve.scheduler` (framework-free, the per-stage queues), :mod:`~dvt_core.serve.app`
(the ASGI app; Starlette, imported when an app is made) and :mod:`~dvt_core.serve.metrics` (Prometheus
text); the load test is :mod:`dvt_core.bench.loadtest`. Nothing here imports a web framework or a model
framework at module import.
"""
