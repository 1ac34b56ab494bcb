"""The Open Inference Protocol v2 (KServe v2, REST), the part ``dvt serve`` speaks: request parsing and
answer encoding, framework-free and without HTTP (dvt_core.serve.app routes the requests here).

An inference request carries one input tensor of N images: ``UINT8`` pixels ``[N, H, W]`` or
``[N, H, W, C]`` at the model's size, ``FP32`` images already normalised ``[N, C, H, W]``, or ``BYTES``
``[N]``, each element an encoded image file (base64 text in JSON, raw bytes as a binary tensor). Tensors
come as JSON numbers (``data``, flat or nested) or, with the binary tensor data extension, as raw
little-endian bytes after the JSON header (``Inference-Header-Content-Length``; ``binary_data_size`` in
the input's parameters; a BYTES element is a 4-byte little-endian length and its bytes). Outputs are
:data:`OUTPUTS`, requested by name; JSON unless ``binary_data`` is asked for (per output, or
``binary_data_output`` for all).

Every refusal is a :class:`~dvt_core.errors.RequestError` with an HTTP status; no
message echoes what was sent beyond names and numbers checked against bounds.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from dvt_core.errors import RequestError

VERSION = "1"
"""The one version a dvt model has (``/v2/models/{name}/versions/1``)."""

# output name -> (datatype, what it holds); the first five are sent when a request names none
OUTPUTS = {
    "label": ("BYTES", "class name of the prediction"),
    "class_index": ("INT64", "class index of the prediction"),
    "confidence": ("FP32", "confidence at the exit taken"),
    "exit": ("INT32", "exit taken, counted from 1"),
    "macs": ("INT64", "multiply-accumulates spent on the image"),
    "prediction": ("BYTES", "the same as label (the name dvt predict --json uses)"),
    "exit_confidences": ("FP32", "[N, exits] confidence at every exit, -1 where the image never ran"),
    "top_k_class_index": ("INT64", "[N, top_k] the most probable classes at the exit taken"),
    "top_k_probability": ("FP32", "[N, top_k] their softmax probabilities"),
}
DEFAULT_OUTPUTS = ("label", "class_index", "confidence", "exit", "macs")
_NUMPY = {"UINT8": np.uint8, "FP32": np.float32, "INT32": np.int32, "INT64": np.int64}
MAX_HEADER_BYTES = 1 << 20  # the JSON part of a request: more is no request this service takes


@dataclass
class InferRequest:
    """A parsed ``/infer`` body: the one input (its datatype, shape and data: a numpy array, or a list of
    bytes for BYTES), the request's id and parameters, and the outputs asked for with their binary flags."""

    datatype: str
    shape: tuple
    data: object
    id: Optional[str] = None
    parameters: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)  # [(name, binary)]


def _json_object(raw: bytes) -> dict:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the request is not valid JSON (an inference request object)") from None
    if not isinstance(doc, dict):
        raise RequestError(400, "the request must be a JSON object with 'inputs'")
    return doc


def parse_infer(body: bytes, header_length: Optional[str], max_images: int) -> InferRequest:
    """The request in ``body`` (``header_length``: the Inference-Header-Content-Length header, or None for
    all-JSON); RequestError 400 for a malformed one, 413 for more than ``max_images`` images."""
    if header_length is None:
        doc, binary = _json_object(body), b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > min(len(body), MAX_HEADER_BYTES):
            raise RequestError(400, "bad Inference-Header-Content-Length: it must count the JSON bytes at the "
                                     "start of the body")
        doc, binary = _json_object(body[:int(header_length)]), memoryview(body)[int(header_length):]
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, "send exactly one input tensor (the images) in 'inputs'")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, "'parameters' must be an object")
    datatype, shape = _input_header(inputs[0], max_images)
    data, used = _input_data(inputs[0], datatype, shape, binary)
    if used != len(binary):
        raise RequestError(400, f"the body holds {len(binary)} bytes of binary tensor data, the input declares {used}")
    request_id = doc.get("id")
    return InferRequest(datatype, shape, data, request_id if isinstance(request_id, str) else None, params,
                        _requested_outputs(doc.get("outputs"), bool(params.get("binary_data_output", False))))


def _input_header(spec: dict, max_images: int) -> tuple[str, tuple]:
    datatype, shape = spec.get("datatype"), spec.get("shape")
    if datatype not in ("UINT8", "FP32", "BYTES"):
        raise RequestError(400, "the input's datatype must be UINT8 (pixels), FP32 (normalised images) or "
                                 "BYTES (image files)")
    if not isinstance(shape, list) or not shape or len(shape) > 4 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(400, "the input's shape must be a list of up to 4 sizes, the first the image count")
    if shape[0] > max_images:
        raise RequestError(413, f"{shape[0]} images in one request; at most {max_images} per request")
    return datatype, tuple(shape)


def _input_data(spec: dict, datatype: str, shape: tuple, binary: memoryview) -> tuple[object, int]:
    """(the input's data, how many bytes of the binary part it used)."""
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise RequestError(400, "the input's binary_data_size does not fit the binary part of the body")
        if datatype == "BYTES":
            return _bytes_elements(bytes(binary[:size]), shape), size
        count, item = math.prod(shape), np.dtype(_NUMPY[datatype]).itemsize
        if size != count * item:
            raise RequestError(400, f"binary_data_size is {size} bytes; shape {list(shape)} of {datatype} "
                                     f"needs {count * item}")
        # a read-only view of the body, not a copy: the service normalises (UINT8) or copies (FP32) it next
        return np.frombuffer(binary, dtype=np.dtype(_NUMPY[datatype]).newbyteorder("<"), count=count).reshape(shape), size
    if "data" not in spec:
        raise RequestError(400, "the input has neither 'data' nor binary_data_size")
    if datatype == "BYTES":
        return _base64_elements(spec["data"], shape), 0
    return _json_numbers(spec["data"], datatype, shape), 0


def _json_numbers(data, datatype: str, shape: tuple) -> np.ndarray:
    try:
        a = np.asarray(data, dtype=np.float64)
    except (ValueError, TypeError):
        raise RequestError(400, f"the input's data must be {datatype} numbers") from None
    if a.size != math.prod(shape):
        raise RequestError(400, f"the input's data holds {a.size} numbers; shape {list(shape)} needs "
                                 f"{math.prod(shape)}")
    if datatype == "UINT8" and (not np.isfinite(a).all() or (a != np.round(a)).any() or a.min(initial=0) < 0
                                or a.max(initial=0) > 255):
        raise RequestError(400, "UINT8 data must be whole numbers from 0 to 255")
    return a.astype(_NUMPY[datatype]).reshape(shape)


def _bytes_elements(raw: bytes, shape: tuple) -> list:
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise RequestError(400, "a BYTES element's 4-byte length is cut short")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise RequestError(400, "a BYTES element is longer than the binary data left")
        out.append(raw[at + 4:at + 4 + n])
        at += 4 + n
    _check_count(len(out), shape)
    return out


def _base64_elements(data, shape: tuple) -> list:
    flat = data if isinstance(data, list) else [data]
    if not all(isinstance(d, str) for d in flat):
        raise RequestError(400, "BYTES data in JSON must be base64 strings, one per image file")
    try:
        out = [base64.b64decode(d, validate=True) for d in flat]
    except (binascii.Error, ValueError):
        raise RequestError(400, "BYTES data in JSON must be base64 strings, one per image file") from None
    _check_count(len(out), shape)
    return out


def _check_count(count: int, shape: tuple) -> None:
    if len(shape) != 1 or count != shape[0]:
        raise RequestError(400, f"BYTES input of shape {list(shape)} holds {count} element(s); send shape [N] "
                                 "with one image file per element")


def _requested_outputs(outputs, binary_default: bool) -> list:
    if outputs is None:
        return [(name, binary_default) for name in DEFAULT_OUTPUTS]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise RequestError(400, "'outputs' must be a list of objects with a 'name'")
    wanted = []
    for o in outputs:
        if o["name"] not in OUTPUTS:
            raise RequestError(400, f"unknown output {_printable(o['name'])!r}; outputs: {', '.join(OUTPUTS)}")
        wanted.append((o["name"], bool((o.get("parameters") or {}).get("binary_data", binary_default))))
    return wanted


def _printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:64]


def encode_response(model_name: str, request_id: Optional[str], tensors: list) -> tuple[bytes, dict]:
    """The body and headers of an inference response; ``tensors``: ``[(name, datatype, array, binary)]``
    (BYTES arrays hold str). Binary outputs follow the JSON header, in order."""
    outputs, blobs = [], []
    for name, datatype, array, binary in tensors:
        out = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = _to_bytes(datatype, array)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = array.reshape(-1).tolist()
        outputs.append(out)
    doc = {"model_name": model_name, "model_version": VERSION, "outputs": outputs}
    if request_id is not None:
        doc["id"] = request_id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {"Content-Type": "application/octet-stream",
                                    "Inference-Header-Content-Length": str(len(head))}


def _to_bytes(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":  # each distinct string encoded once (a request's labels repeat a few class names)
        flat = array.reshape(-1).tolist()
        element = {s: struct.pack("<I", len(b)) + b for s in set(flat) for b in (s.encode(),)}
        return b"".join(map(element.__getitem__, flat))
    return np.ascontiguousarray(array, dtype=np.dtype(_NUMPY[datatype]).newbyteorder("<")).tobytes()
