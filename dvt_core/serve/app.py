"""The HTTP service (an ASGI app on Starlette): ``POST /v1/predict`` (one image file, as the body or a
multipart upload), the Open Inference Protocol v2 (``/v2``, ``/v2/health/{live,ready}``,
``/v2/models/{name}[/versions/1][/ready]``, ``POST .../infer`` with N images: dvt_core.serve.v2),
``GET /healthz`` and ``GET /metrics``.

:class:`PredictService` is the framework-free part (limits, decoding, the scheduler, the answer);
:func:`respond` is the one request handler, behind :func:`create_app`'s Starlette app and the Ray Serve
deployment (dvt_core.integrations.ray) alike. Starlette is imported only when an app or a response is
made (the ``serve`` extra).

Safety: a body is bounded before it is read whole (Content-Length, then while streaming), reading it
is bounded in time, the queue is bounded (a full queue answers 503 at once, with Retry-After), every
request waits a bounded time for its answer (then 504); nothing from a request is used as a path, and
an error message never echoes what was sent.
"""
from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np

from dvt_core.errors import InputError, RequestError


@dataclass
class ServeLimits:
    """Bounds of the service: batching, queue, body size and the time a request may take."""

    max_batch: int = 32
    max_wait_ms: float = 2.0
    queue_limit: int = 256
    max_body_mb: float = 8.0
    max_images: Optional[int] = None  # images in one /v2 request (each takes a place in the queue); None: queue_limit
    read_timeout_s: float = 10.0  # to receive a whole body (a slow client gets 408)
    request_timeout_s: float = 30.0  # from a full body to the answer (then 504)
    retry_after_s: int = 1

    def check(self) -> "ServeLimits":
        if self.max_images is None:
            self.max_images = int(self.queue_limit)
        for name in ("max_batch", "queue_limit", "max_images"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise InputError(f"--max-wait-ms must be 0 or more, got {self.max_wait_ms:g}")
        if self.max_images > self.queue_limit:
            raise InputError(f"--max-images ({self.max_images}) must not exceed --queue-limit ({self.queue_limit}): "
                             "a request of that many images could never be queued")
        if not 0 < self.max_body_mb <= 1024:
            raise InputError(f"--max-body-mb must be above 0 and at most 1024, got {self.max_body_mb:g}")
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


_UNSAFE = re.compile(r"[^ -~]")


def _safe_reason(exc: BaseException) -> str:
    """The reason of a decoding error without the name the reader gave the bytes, printable ASCII, bounded."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split(": ", 1)[1] if text.startswith("image: ") else text
    return _UNSAFE.sub("?", text)[:200]


class PredictService:
    """One model behind a :class:`~dvt_core.serve.scheduler.StageScheduler`, with its limits and metrics."""

    def __init__(self, model, thresholds, limits: Optional[ServeLimits] = None, classes: Optional[list] = None,
                 mac_budget: Optional[float] = None, adapt_budget: bool = False, decode_workers: int = 2):
        from dvt_core.data.datasets import model_name
        from dvt_core.serve.metrics import ServiceMetrics
        from dvt_core.serve.scheduler import StageScheduler

        self.limits = (limits or ServeLimits()).check()
        self.model, self.spec = model, model.spec
        self.name = self.spec.name  # the architecture's name: the model's in /v2/models/{name}
        # the name the weights were trained under (as ``dvt serve`` announces it): /healthz says it
        self.trained_name = model_name(getattr(model, "checkpoint_meta", None), self.spec.name)
        if self.spec.in_chans not in (1, 3):
            raise InputError(f"{self.spec.name} takes {self.spec.in_chans}-channel images; "
                             "image files give 1 (grey) or 3 (RGB)")
        self.classes = classes
        self.labels = np.asarray([self.label(k) for k in range(self.spec.num_classes)], dtype=object)
        self.metrics = ServiceMetrics(self.spec.num_exits, self.limits.max_batch, model.exit_macs,
                                      mac_budget=mac_budget)
        if adapt_budget and mac_budget is None:
            raise InputError("adapting the thresholds at run time needs a MAC budget (--budget MACS)")
        self.scheduler = StageScheduler(model, thresholds, self.limits.max_batch, self.limits.max_wait_ms,
                                        self.limits.queue_limit, observer=self.metrics.stage_ran,
                                        adapt_budget=mac_budget if adapt_budget else None)
        self.metrics.depths = self.scheduler.depths
        self.metrics.model_cpu = lambda: self.scheduler.model_cpu_s
        self.metrics.thresholds = lambda: self.scheduler.thresholds
        self.thresholds = self.scheduler.thresholds
        self._decoder = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="dvt-serve-decode")

    def decode(self, body: bytes) -> np.ndarray:
        """The normalised float32 image (C, H, W) of an image file's bytes, read as ``dvt predict`` reads
        a file (dvt_core.data.images.read_image); RequestError 400 when the bytes are no image."""
        from dvt_core.data.images import ImageReadError, read_image
        from dvt_core.data.images import normalize

        if not body:
            raise RequestError(400, "empty body: send the bytes of an image file (PNG, JPEG, BMP, WebP, GIF, TIFF)")
        try:
            img = read_image(io.BytesIO(body), self.spec.img_size, self.spec.in_chans)
        except (ImageReadError, OSError, ValueError) as exc:
            reason = _safe_reason(exc)
            raise RequestError(400, reason if reason.startswith("unreadable") else f"unreadable image: {reason}"
                               ) from None
        return normalize(img[None], self.spec.mean, self.spec.std)[0]

    def label(self, class_index: int) -> str:
        return self.classes[class_index] if self.classes else str(class_index)

    def answer(self, prediction) -> dict:
        """One image's answer in the words ``dvt predict --json`` uses (``prediction`` and ``label`` both
        name the class)."""
        k = prediction.class_index
        label = self.label(k)
        return {"prediction": label, "label": label, "class_index": k, "confidence": round(prediction.confidence, 6),
                "exit": prediction.exit, "macs": prediction.macs}

    async def predict(self, body: bytes) -> dict:
        """The answer for one image's bytes; RequestError for a bad body, a full queue or a timeout."""
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(self._decoder, self.decode, body)
        return self.answer(await self._answered(lambda: self.scheduler.submit(image)))

    async def predict_many(self, images: np.ndarray, thresholds: Optional[np.ndarray] = None):
        """The :class:`~dvt_core.serve.scheduler.Answers` of N normalised images (N, C, H, W), scheduled
        image by image through the stages' queues (``thresholds``: these images' own, else the service's)."""
        return await self._answered(lambda: self.scheduler.submit_many(images, thresholds))

    async def _answered(self, submit):
        """The result of the future ``submit()`` returns, with the service's refusals as RequestError:
        503 (queue full, shutting down), 504 (no answer in time), 500 (the model failed)."""
        from dvt_core.errors import QueueFullError, SchedulerClosedError

        retry = {"Retry-After": str(self.limits.retry_after_s)}
        try:
            future = submit()
        except QueueFullError:
            raise RequestError(503, "the service is at capacity; retry shortly", retry) from None
        except SchedulerClosedError:
            raise RequestError(503, "the service is shutting down", retry) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(504, f"no answer within {self.limits.request_timeout_s:g} s") from None
        except Exception:  # a model failure: never echoed
            raise RequestError(500, "the model failed on this batch") from None

    def healthy(self) -> bool:
        return self.scheduler.alive

    def close(self) -> None:
        """Answer what is queued, then stop the worker and the decoders."""
        self.scheduler.close()
        self._decoder.shutdown(wait=True)


async def read_body(request, limit: int, timeout: float) -> bytes:
    """The whole body of a Starlette request, refused (413) above ``limit`` bytes before it is read whole:
    from Content-Length, then while streaming; a body not received within ``timeout`` s is 408."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise RequestError(400, "bad Content-Length header")
        if int(length) > limit:
            raise RequestError(413, f"body of {int(length)} bytes is over the limit of {limit} bytes")

    async def receive() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"body not received within {timeout:g} s") from None


def _json(status: int, payload: dict, headers: Optional[dict] = None):
    from starlette.responses import JSONResponse

    return JSONResponse(payload, status_code=status, headers=headers)


def image_of_multipart(body: bytes, content_type: str) -> bytes:
    """The bytes of the one file of a ``multipart/form-data`` body (``curl -F file=@img.png``)."""
    from email import policy
    from email.parser import BytesParser

    message = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body)
    files = [part for part in message.iter_parts() if part.get_filename() is not None] \
        if message.is_multipart() else []
    if len(files) != 1:
        raise RequestError(400, f"a multipart upload must hold exactly one file (got {len(files)}): "
                                "curl -F file=@image.png URL/v1/predict")
    return files[0].get_payload(decode=True) or b""


async def predict_response(service: PredictService, request):
    """The response to ``POST /v1/predict``: one image file, as the body or as a multipart upload."""
    body = await read_body(request, service.limits.max_body_bytes, service.limits.read_timeout_s)
    content_type = request.headers.get("content-type", "")
    if content_type.lower().startswith("multipart/"):
        body = image_of_multipart(body, content_type)
    return _json(200, await service.predict(body))


async def infer_response(service: PredictService, request):
    """The response to ``POST /v2/models/{name}[/versions/{v}]/infer``."""
    from starlette.responses import Response

    from dvt_core.serve import v2

    body = await read_body(request, service.limits.max_body_bytes, service.limits.read_timeout_s)
    content, headers = await v2.infer(service, body, request.headers.get("inference-header-content-length"))
    return Response(content, headers=headers, media_type=headers.pop("Content-Type"))


def _v2_route(service: PredictService, path: str):
    """(what a /v2 path asks for, its methods) or RequestError 404 for a model or version this service has not."""
    from dvt_core.serve import protocol

    parts = path.split("/")[2:]  # "", "v2", ...
    if parts in ([], ["health", "live"], ["health", "ready"]):
        return ("server",) + tuple(parts), ("GET",)
    if len(parts) < 2 or parts[0] != "models":
        raise RequestError(404, "not found: see GET /v2 and GET /v2/models/{name}")
    if parts[1] != service.name:
        raise RequestError(404, f"no model of that name here; this service serves {service.name!r}")
    rest = parts[2:]
    if rest[:1] == ["versions"]:
        if len(rest) < 2 or rest[1] != protocol.VERSION:
            raise RequestError(404, f"no such version of {service.name!r}; its one version is {protocol.VERSION}")
        rest = rest[2:]
    if rest in ([], ["ready"]):
        return ("model",) + tuple(rest), ("GET",)
    if rest == ["infer"]:
        return ("infer",), ("POST",)
    raise RequestError(404, "not found: see GET /v2/models/{name}")


ROUTES = "POST /v1/predict, POST /v2/models/{name}/infer, GET /v2/models/{name}, GET /healthz, GET /metrics"


async def _routed(service: PredictService, request, path: str):
    """The response to any request: the one handler of ``dvt serve`` and the Ray Serve deployment."""
    from starlette.responses import PlainTextResponse

    from dvt_core.serve import v2
    from dvt_core.serve.metrics import CONTENT_TYPE

    fixed = {"/v1/predict": (("v1",), ("POST",)), "/healthz": (("healthz",), ("GET",)),
             "/metrics": (("metrics",), ("GET",))}
    what, methods = fixed[path] if path in fixed else _v2_route(service, path) if path.startswith("/v2") \
        else (None, ())
    if what is None:
        raise RequestError(404, f"not found: use {ROUTES}")
    if request.method not in methods:
        raise RequestError(405, f"method {request.method} not allowed here: use {methods[0]} {path}",
                           {"Allow": ", ".join(methods)})
    if what == ("v1",):
        return await predict_response(service, request)
    if what == ("infer",):
        return await infer_response(service, request)
    ok = service.healthy()
    if what == ("healthz",):
        return _json(200 if ok else 503, {"status": "ok" if ok else "unavailable", "model": service.trained_name})
    if what == ("metrics",):
        return PlainTextResponse(service.metrics.render(), media_type=CONTENT_TYPE)
    if what in (("server",), ("model",)):
        return _json(200, v2.server_metadata() if what == ("server",) else v2.model_metadata(service))
    live = what == ("server", "health", "live")
    return _json(200 if ok or live else 503, {"live" if live else "ready": ok or live})


async def respond(service: PredictService, request, path: Optional[str] = None):
    """:func:`_routed`'s response, every refusal as a JSON ``{"error": ...}`` with its status; the request
    counted in the service's metrics (``path``: the request's path below any route prefix)."""
    start = time.perf_counter()
    path = (path or request.url.path).rstrip("/") or "/"
    try:
        response = await _routed(service, request, path)
    except RequestError as exc:
        response = _json(exc.status, {"error": str(exc)}, exc.headers)
    except Exception:  # a bug must not answer with a traceback or a bare text page: logged, a JSON 500
        logging.getLogger("dvt.serve").exception("unexpected failure answering %s", _UNSAFE.sub("?", path[:200]))
        response = _json(500, {"error": "internal error"})
    if path == "/v1/predict" or path.endswith("/infer"):  # inference requests, not probes and scrapes
        service.metrics.request_done(response.status_code, time.perf_counter() - start)
    return response


def create_app(service: PredictService):
    """The Starlette app of ``service``; its shutdown answers what is queued and stops the worker."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.routing import Route

    async def endpoint(request):
        return await respond(service, request)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)], lifespan=lifespan)


def bind_socket(host: str, port: int):
    """A listening TCP socket on ``host:port`` (port 0: a free port the system picks)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets (and the ones they accept);
    # without it a response's headers and body, written apart, wait ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(service: PredictService, host: str = "127.0.0.1", port: int = 0, max_connections: int = 256,
               keep_alive_s: float = 5.0, graceful_s: float = 30.0, announce=None) -> None:
    """Serve ``service`` with uvicorn until SIGTERM or SIGINT; ``announce(url)`` once it accepts connections.

    SIGTERM stops accepting, lets the requests in flight finish (up to ``graceful_s``), answers what is
    queued and returns (a caller exits 0). ``max_connections`` bounds open connections and requests
    (uvicorn answers 503 past it); idle keep-alive connections close after ``keep_alive_s``.
    """
    import gc
    import signal

    import uvicorn

    sock = bind_socket(host, port)
    url = url_of(sock)

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if announce is not None and not self.should_exit:
                announce(url)

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # a graceful stop is the expected end: not raised again afterwards
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    config = uvicorn.Config(create_app(service), log_level="warning", access_log=False, lifespan="on",
                            limit_concurrency=max_connections, timeout_keep_alive=keep_alive_s,
                            timeout_graceful_shutdown=graceful_s, h11_max_incomplete_event_size=16 * 1024,
                            http="h11", loop="asyncio", ws="none", server_header=False)
    # the model, the imports and the app are built and live as long as the process: moved out of the
    # collector's reach, a full collection no longer walks their ~200k objects (100+ ms on a loaded box,
    # a pause every request in flight then waits out: the service's tail latency)
    gc.collect()
    gc.freeze()
    try:
        _Server(config).run(sockets=[sock])
    finally:
        sock.close()
