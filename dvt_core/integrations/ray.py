"""Scale-out on Ray: batch inference with Ray Data, and the ``dvt serve`` scheduler as a Ray Serve deployment.

* :class:`DVTPredictor` is a callable class for ``ray.data.Dataset.map_batches``: Ray runs it in
  stateful actors, so the model loads once per actor; each batch of uint8 images comes back with
  ``label``, ``class_index``, ``confidence``, ``exit`` (1-based) and ``macs`` columns, from streaming
  early exit inside the actor (:func:`dvt_core.runtime.evaluation.adaptive`)::

      ds = ray.data.from_items([{"image": img} for img in images])
      out = ds.map_batches(DVTPredictor, fn_constructor_kwargs={"model": "dvt_fashion_mnist"},
                           batch_size=256, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1)

* :func:`serve_deployment` binds a Ray Serve deployment that runs :class:`dvt_core.serve.app.PredictService`
  (the per-stage batching scheduler) in each replica, so many replicas serve one endpoint with the
  same routes and handler as ``dvt serve`` (``/v1/predict``, the Open Inference Protocol v2, ``/healthz``),
  and a ``/metrics`` that sums the replicas' counters.

Ray is imported only inside these functions (the ``ray`` extra); this module imports without it.
"""
from __future__ import annotations

import gc
from typing import Optional, Sequence

import numpy as np

from dvt_core.errors import InputError

OUTPUT_COLUMNS = ("label", "class_index", "confidence", "exit", "macs")


def _load(model: str, weights, backend: str, device, thresholds, budget):
    """(the model, its thresholds, its class names): thresholds given, those calibrated for ``budget``, or the
    checkpoint's default, as ``dvt predict`` chooses them."""
    import dvt_core
    from dvt_core.data.datasets import model_classes
    from dvt_core.runtime.operating_point import choose_thresholds

    built = dvt_core.build(model, backend=backend, weights=weights)
    if device is not None:
        from dvt_core.runtime.contract import backend_of

        built = backend_of(built).to_device(built, device)
    meta = dict(getattr(built, "checkpoint_meta", None) or {})
    chosen, _ = choose_thresholds(built.spec, meta, str(weights), thresholds=thresholds, budget=budget)
    return built, chosen, model_classes(meta, built.spec.num_classes)


class DVTPredictor:
    """``map_batches`` callable: a batch ``{image_column: uint8 (N, H, W[, C]), ...}`` in, the same batch
    with the :data:`OUTPUT_COLUMNS` set (the image column dropped unless ``keep_images``) out.

    Images of the model's size and channels go to the model as they are (what ``dvt predict`` computes
    from the files they came from); others are resized and converted by ``dvt_core.data.images.preprocess``.
    ``stage_batch`` is the batch every stage runs on inside the actor (streaming early exit).
    """

    def __init__(self, model: str = "dvt_fashion_mnist", weights="default", backend: str = "torch",
                 device: Optional[str] = None, thresholds: Optional[Sequence[float]] = None,
                 budget: Optional[float] = None, image_column: str = "image", stage_batch: int = 64,
                 keep_images: bool = False):
        if stage_batch < 1:
            raise InputError(f"stage_batch must be 1 or more, got {stage_batch}")
        self.model, self.thresholds, self.classes = _load(model, weights, backend, device, thresholds, budget)
        self.image_column, self.stage_batch, self.keep_images = image_column, stage_batch, keep_images

    def __call__(self, batch: dict) -> dict:
        column = self.image_column
        if column not in batch and column == "image" and list(batch) == ["data"]:
            column = "data"  # ray.data.from_numpy(images) names its one column "data"
        if column not in batch:
            raise InputError(f"the batch has no {column!r} column (it has {', '.join(map(str, batch))})")
        res = self.predict(np.asarray(batch[column]))
        out = {k: v for k, v in batch.items() if self.keep_images or k != column}
        pred = res.prediction
        out["label"] = np.asarray([self.classes[k] if self.classes else str(k) for k in pred.tolist()], dtype=object)
        out["class_index"] = pred.astype(np.int64)
        out["confidence"] = res.confidence.astype(np.float32)
        out["exit"] = (res.exit_index + 1).astype(np.int64)
        out["macs"] = res.macs.astype(np.int64)
        return out

    def predict(self, images: np.ndarray):
        """The :class:`~dvt_core.runtime.early_exit.AdaptiveResult` of a uint8 batch (N, H, W[, C]), in order."""
        from dvt_core.runtime import evaluation

        spec = self.model.spec
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise InputError(f"DVTPredictor takes uint8 image batches (N, H, W[, C]); got {images.dtype} "
                             f"of shape {images.shape}")
        if len(images) == 0:
            return evaluation.adaptive(self.model, np.zeros((0, spec.img_size, spec.img_size), np.uint8),
                                       self.thresholds)
        if not self._fits(images):
            images = self._resized(images)
        return evaluation.adaptive(self.model, images, self.thresholds, batch_size=self.stage_batch)

    def _fits(self, images: np.ndarray) -> bool:
        spec = self.model.spec
        channels = 1 if images.ndim == 3 else images.shape[-1]
        return images.shape[1:3] == (spec.img_size, spec.img_size) and channels == spec.in_chans

    def _resized(self, images: np.ndarray) -> np.ndarray:
        """uint8 images at the model's size and channels (the safe path of ``preprocess``), unnormalised."""
        from dvt_core.data.images import preprocess

        spec = self.model.spec
        x = preprocess(images, spec)  # normalised float32 (N, C, H, W): undo the normalisation, exactly
        mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
        pixels = np.clip(np.rint((x * std + mean) * 255.0), 0, 255).astype(np.uint8)
        return pixels[:, 0] if spec.in_chans == 1 else pixels.transpose(0, 2, 3, 1)


METRICS_BOARD = "dvt-serve-metrics"
"""The name (namespace ``dvt``) of the detached actor holding every replica's latest counters."""


def _metrics_board(app_name: str):
    """The one actor per application where replicas leave their counters, so ``/metrics`` from any replica
    reports the whole deployment (Prometheus would otherwise see counters jump between replicas)."""
    import ray

    @ray.remote(num_cpus=0)
    class MetricsBoard:
        def __init__(self):
            self.states: dict = {}

        def put(self, replica: str, state: dict) -> None:
            self.states[replica] = state  # a replica that stopped keeps its last counters: totals never drop

        def states_now(self) -> list:
            return list(self.states.values())

    return MetricsBoard.options(name=f"{METRICS_BOARD}-{app_name}", namespace="dvt", lifetime="detached",
                                get_if_exists=True).remote()


def serve_deployment(model: str = "dvt_fashion_mnist", weights="default", backend: str = "torch",
                     thresholds: Optional[Sequence[float]] = None, budget: Optional[float] = None,
                     limits: Optional[dict] = None, num_replicas: int = 1, ray_actor_options: Optional[dict] = None,
                     metrics_every_s: float = 1.0):
    """A bound Ray Serve application: ``num_replicas`` replicas, each with its own model and per-stage
    scheduler (:class:`dvt_core.serve.app.PredictService`, ``limits`` its :class:`ServeLimits` fields),
    answering every route of ``dvt serve`` (``/v1/predict``, the Open Inference Protocol v2 under ``/v2``,
    ``/healthz``, ``/metrics``) through the same handler, :func:`dvt_core.serve.app.respond`. ``/metrics``
    sums every replica's counters (each reports them every ``metrics_every_s`` seconds and on a scrape).
    Run it with ``ray.serve.run(app, route_prefix="/")``."""
    from ray import serve

    from dvt_core.serve.app import ServeLimits

    ServeLimits(**(limits or {})).check()  # a bad limit is refused here, not in every replica

    @serve.deployment(num_replicas=num_replicas, ray_actor_options=ray_actor_options or {"num_cpus": 1})
    class DVTDeployment:
        def __init__(self):
            import threading
            import uuid

            from dvt_core.serve.app import PredictService

            built, chosen, classes = _load(model, weights, backend, None, thresholds, budget)
            self.service = PredictService(built, chosen, ServeLimits(**(limits or {})), classes=classes,
                                          mac_budget=budget)
            gc.collect()  # as `dvt serve` does: the start-up objects out of the collector's reach (the tail latency)
            gc.freeze()
            self.replica, self.board = uuid.uuid4().hex, _metrics_board(serve.get_replica_context().app_name)
            self.stopped = threading.Event()
            threading.Thread(target=self._report, daemon=True, name="dvt-metrics-report").start()

        def _report(self) -> None:
            while not self.stopped.wait(metrics_every_s):
                self.board.put.remote(self.replica, self.service.metrics.state())

        async def __call__(self, request):
            from starlette.responses import PlainTextResponse

            from dvt_core.serve.app import respond
            from dvt_core.serve.metrics import CONTENT_TYPE

            root = request.scope.get("root_path", "")
            path = request.url.path[len(root):] if root and request.url.path.startswith(root) else request.url.path
            if path.rstrip("/") == "/metrics" and request.method == "GET":
                await self.board.put.remote(self.replica, self.service.metrics.state())
                text = self.service.metrics.render_merged(await self.board.states_now.remote())
                return PlainTextResponse(text, media_type=CONTENT_TYPE)
            return await respond(self.service, request, path)

        def __del__(self):
            stopped = getattr(self, "stopped", None)
            if stopped is not None:
                stopped.set()
            service = getattr(self, "service", None)
            if service is not None:
                service.close()

    return DVTDeployment.bind()
