"""The service's side of the Open Inference Protocol v2: images from a request's tensor, the request's
operating point, the answer's tensors and the metadata documents (dvt_core.serve.protocol parses and
encodes; dvt_core.serve.app routes). The words are those of ``dvt predict --json``: ``label``
(``prediction``), ``class_index``, ``confidence``, ``exit`` (counted from 1) and ``macs``.
"""
from __future__ import annotations

import asyncio
import functools
from typing import Optional

import numpy as np

from dvt_core.errors import DVTError, RequestError
from dvt_core.serve import protocol


def _in_model_shape(service, req) -> np.ndarray:
    """UINT8 pixels or FP32 normalised images as normalised float32 (N, C, H, W), checked against the model."""
    spec, n = service.spec, req.shape[0]
    size, chans = spec.img_size, spec.in_chans
    if req.datatype == "FP32":
        if req.shape != (n, chans, size, size):
            raise RequestError(400, f"FP32 images must have shape [N, {chans}, {size}, {size}] (normalised, "
                                     f"channels first); got {list(req.shape)}")
        x = np.array(req.data, dtype=np.float32)  # a copy: the request's data may be a read-only view of its body
        if not np.isfinite(x).all():
            raise RequestError(400, "FP32 images hold NaN or infinite values")
        return x
    pixel_shapes = [(n, size, size, chans)] + ([(n, size, size)] if chans == 1 else [])
    if req.shape not in pixel_shapes:
        want = " or ".join(str(list(("N",) + s[1:])).replace("'", "") for s in pixel_shapes)
        raise RequestError(400, f"UINT8 images must have shape {want}; got {list(req.shape)}")
    table = _pixel_table(tuple(np.ravel(spec.mean).tolist()), tuple(np.ravel(spec.std).tolist()), chans)
    pixels = np.asarray(req.data, dtype=np.uint8)
    if pixels.ndim == 3:
        return table[0][pixels][:, None]
    return np.stack([table[c][pixels[..., c]] for c in range(chans)], axis=1)


@functools.lru_cache(maxsize=8)
def _pixel_table(mean: tuple, std: tuple, chans: int) -> np.ndarray:
    """float32 (C, 256): what ``dvt_core.data.images.normalize`` makes of each pixel value in each channel, so
    a request's pixels are normalised by one lookup each (the same numbers, in one pass, no float temporaries)."""
    from dvt_core.data.images import normalize

    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, None, :, None], (1, 1, 256, chans))
    return normalize(ramp, mean, std)[0, :, 0, :]


async def images_of(service, req) -> np.ndarray:
    """The request's images, normalised float32 (N, C, H, W); image files are decoded as ``dvt predict``
    reads them, on the service's decoding threads."""
    if req.datatype != "BYTES":
        return _in_model_shape(service, req)
    loop = asyncio.get_running_loop()
    decoded = await asyncio.gather(*(loop.run_in_executor(service._decoder, service.decode, b) for b in req.data))
    spec = service.spec
    return np.stack(decoded) if decoded else np.zeros((0, spec.in_chans, spec.img_size, spec.img_size), np.float32)


def request_thresholds(service, params: dict) -> Optional[np.ndarray]:
    """The request's own thresholds (``thresholds``, or those calibrated for ``budget``), checked; None when
    it names neither (the service's operating point)."""
    from dvt_core.runtime.early_exit import normalize_thresholds
    from dvt_core.runtime.operating_point import budget_operating_point

    spec = service.spec
    if "thresholds" in params and "budget" in params:
        raise RequestError(400, "parameters 'thresholds' and 'budget' exclude each other: send one")
    if "thresholds" in params:
        t = params["thresholds"]
        if not isinstance(t, list) or len(t) not in (spec.num_exits - 1, spec.num_exits) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in t):
            raise RequestError(400, f"parameter 'thresholds' must be {spec.num_exits - 1} numbers from 0 to 1 "
                                     "(one per exit but the last)")
        return normalize_thresholds(t, spec.num_exits)
    if "budget" in params:
        budget, macs = params["budget"], service.model.exit_macs
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not macs[0] <= budget <= macs[-1]:
            raise RequestError(400, f"parameter 'budget' must be MACs per image from {macs[0]} to {macs[-1]}")
        meta = dict(getattr(service.model, "checkpoint_meta", None) or {})
        try:
            return normalize_thresholds(budget_operating_point(meta, float(budget), spec, "the model")["thresholds"],
                                        spec.num_exits)
        except DVTError:
            raise RequestError(400, "parameter 'budget': the model holds no calibrated budgets; send "
                                     "'thresholds'") from None
    return None


def _top_k(service, params: dict) -> int:
    classes = service.spec.num_classes
    k = params.get("top_k", min(5, classes))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= classes:
        raise RequestError(400, f"parameter 'top_k' must be a whole number from 1 to {classes}")
    return k


def output_tensors(service, answers, req) -> list:
    """``[(name, datatype, array, binary)]`` of the outputs the request asked for, from the scheduler's
    :class:`~dvt_core.serve.scheduler.Answers` columns (no object per image)."""
    from dvt_core.runtime.policy import softmax

    n = len(answers)
    columns = {
        "label": lambda: service.labels[answers.class_index],
        "class_index": lambda: answers.class_index,
        "confidence": lambda: answers.confidence,
        "exit": lambda: answers.exit.astype(np.int32),
        "macs": lambda: answers.macs,
        "exit_confidences": lambda: np.nan_to_num(answers.exit_confidences, nan=-1.0),
    }
    columns["prediction"] = columns["label"]
    wants_top = any(name.startswith("top_k") for name, _ in req.outputs)
    k = _top_k(service, req.parameters) if wants_top else 0
    if wants_top:
        probs = softmax(answers.logits.astype(np.float64)) if n else np.zeros((0, k))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        columns["top_k_class_index"] = lambda: order.astype(np.int64)
        columns["top_k_probability"] = lambda: np.take_along_axis(probs, order, axis=1).astype(np.float32)
    return [(name, protocol.OUTPUTS[name][0], columns[name](), binary) for name, binary in req.outputs]


async def infer(service, body: bytes, header_length: Optional[str]) -> tuple[bytes, dict]:
    """The body and headers answering an ``/infer`` request; RequestError when refused."""
    req = protocol.parse_infer(body, header_length, service.limits.max_images)
    thresholds = request_thresholds(service, req.parameters)
    if any(name.startswith("top_k") for name, _ in req.outputs):
        _top_k(service, req.parameters)  # refused before any work
    images = await images_of(service, req)
    answers = await service.predict_many(images, thresholds)
    return protocol.encode_response(service.name, req.id, output_tensors(service, answers, req))


def model_metadata(service) -> dict:
    """``GET /v2/models/{name}``: the input forms, the outputs, the classes, the exits' MACs and the
    operating point in force."""
    spec = service.spec
    pixels = [-1, spec.img_size, spec.img_size] + ([] if spec.in_chans == 1 else [spec.in_chans])
    return {
        "name": service.name, "versions": [protocol.VERSION], "platform": f"dvt_{service.model.backend_name}",
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": pixels}],
        "outputs": [{"name": name, "datatype": dt, "shape": [-1] if "[" not in what else [-1, -1]}
                    for name, (dt, what) in protocol.OUTPUTS.items()],
        "accepted_inputs": [
            {"datatype": "UINT8", "shape": pixels, "what": "pixels 0..255 at the model's size"},
            {"datatype": "FP32", "shape": [-1, spec.in_chans, spec.img_size, spec.img_size],
             "what": "images normalised as the model expects, channels first"},
            {"datatype": "BYTES", "shape": [-1], "what": "encoded image files (base64 in JSON)"}],
        "classes": [service.label(k) for k in range(spec.num_classes)],
        "exit_macs": [int(m) for m in service.model.exit_macs],
        "thresholds": [float(t) for t in service.scheduler.thresholds[:-1]],
        "max_images_per_request": service.limits.max_images,
        "parameters": {"thresholds": f"{spec.num_exits - 1} numbers from 0 to 1",
                       "budget": "MACs per image (a calibrated operating point)", "top_k": "1 to classes"},
    }


def server_metadata() -> dict:
    """``GET /v2``."""
    from dvt_core.version import __version__

    return {"name": "dvt", "version": str(__version__), "extensions": ["binary_tensor_data"]}
