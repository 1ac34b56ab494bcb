"""Serving a DVT over HTTP with per-stage batching (``dvt serve``).

:mod:`~dvt_core.serve.scheduler` (framework-free, the per-stage queues), :mod:`~dvt_core.serve.app`
(the ASGI app; Starlette, imported when an app is made), :mod:`~dvt_core.serve.metrics` (Prometheus
text) and :mod:`~dvt_core.serve.loadtest` (a loopback load test). Nothing here imports a web framework
or a model framework at module import.
"""
