"""MindSpore ``.ckpt`` files read and written in pure Python, every byte checked before use.

The format is a protobuf ``Checkpoint`` message (MindSpore's ``checkpoint.proto``)::

    message Checkpoint { repeated Value value = 1; }
    message Value { string tag = 1; oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
    message TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }

written as one serialised ``Checkpoint`` per entry, one after the other (protobuf concatenation appends
to the repeated field), optionally followed by ``b"crc_num"`` and a 10-byte big-endian CRC-32.  A tensor
larger than MindSpore's slice size arrives as consecutive entries with the same tag and dims whose
contents join. Strings (``append_dict``) have ``tensor_type "str"``, dims ``[0]`` and UTF-32 content.

:func:`read_ckpt` decodes the wire format by hand with bounds checks on every length and varint, and
validates each tensor's byte length against its dims and dtype before building an array; nothing is
handed to MindSpore or torch unchecked. Any inconsistency raises :class:`CheckpointError` naming the
file, the entry and the problem. :func:`write_ckpt` writes the same layout, readable by
``mindspore.load_checkpoint``.
"""
from __future__ import annotations

import binascii
import os
from typing import Union

import numpy as np

from dvt_core.checkpoint.dtypes import bf16_to_float32
from dvt_core.errors import CheckpointError
from dvt_core.schema import read_bytes

# MindSpore's type names (str(mindspore.dtype)) <-> numpy dtypes (little-endian, as MindSpore writes).
MS_DTYPES = {
    "Bool": np.dtype("bool"), "Int8": np.dtype("int8"), "UInt8": np.dtype("uint8"),
    "Int16": np.dtype("<i2"), "UInt16": np.dtype("<u2"), "Int32": np.dtype("<i4"), "UInt32": np.dtype("<u4"),
    "Int64": np.dtype("<i8"), "UInt64": np.dtype("<u8"), "Float16": np.dtype("<f2"),
    "Float32": np.dtype("<f4"), "Float64": np.dtype("<f8"),
}
BFLOAT16 = "BFloat16"  # read (widened to float32, lossless), never written
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 34          # per tensor; the byte-length check bounds it by the file size anyway
MAX_STRING_BYTES = 4 << 20      # an append_dict string (metadata JSON) of at most 1 Mi characters
MAX_TAG_BYTES = 4096
MAX_ENTRIES = 1 << 17           # entries (slices included) of one file; a DVT has about a thousand tensors
_CRC_MARK = b"crc_num"


class _Reader:
    """Bounds-checked protobuf wire reader over a buffer slice ``[pos, end)``."""

    def __init__(self, buf, pos: int, end: int, where: str):
        self.buf, self.pos, self.end, self.where = buf, pos, end, where

    def fail(self, what: str):
        raise CheckpointError(f"{self.where}: {what} (at byte {self.pos}); not a valid MindSpore checkpoint")

    def varint(self) -> int:
        result, shift = 0, 0
        while True:
            if self.pos >= self.end:
                self.fail("truncated varint")
            b = self.buf[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift >= 64:
                self.fail("varint longer than 10 bytes")

    def key(self) -> tuple[int, int]:
        k = self.varint()
        field, wire = k >> 3, k & 7
        if field == 0:
            self.fail("field number 0")
        return field, wire

    def length(self) -> tuple[int, int]:
        n = self.varint()
        if n > self.end - self.pos:
            self.fail(f"a length of {n} bytes runs past the end of its message ({self.end - self.pos} left)")
        start = self.pos
        self.pos += n
        return start, start + n

    def skip(self, wire: int) -> None:
        if wire == 0:
            self.varint()
        elif wire == 1:
            self._advance(8)
        elif wire == 2:
            self.length()
        elif wire == 5:
            self._advance(4)
        else:
            self.fail(f"unsupported wire type {wire}")

    def _advance(self, n: int) -> None:
        if n > self.end - self.pos:
            self.fail("truncated fixed-size field")
        self.pos += n


def _text(buf, start: int, end: int, r: _Reader, what: str, limit: int) -> str:
    if end - start > limit:
        r.fail(f"{what} of {end - start} bytes (at most {limit})")
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        r.fail(f"{what} is not UTF-8")


def _parse_tensor(buf, start: int, end: int, where: str):
    r = _Reader(buf, start, end, where)
    dims, dtype, content = [], None, None
    while r.pos < r.end:
        field, wire = r.key()
        if field == 1 and wire == 0:
            dims.append(r.varint())
        elif field == 1 and wire == 2:  # packed
            s, e = r.length()
            sub = _Reader(buf, s, e, where)
            while sub.pos < sub.end:
                dims.append(sub.varint())
        elif field == 2 and wire == 2:
            s, e = r.length()
            dtype = _text(buf, s, e, r, "tensor_type", 64)
        elif field == 3 and wire == 2:
            content = r.length()
        else:
            r.skip(wire)
        if len(dims) > MAX_DIMS:
            r.fail(f"more than {MAX_DIMS} dimensions")
    if dtype is None or content is None:
        r.fail("tensor without tensor_type or tensor_content")
    dims = [d - (1 << 64) if d >= 1 << 63 else d for d in dims]  # int64 two's complement
    return dims, dtype, content


def _entries(buf, size: int, where: str):
    """Yield ``(tag, dims, dtype, (start, end))`` for every entry, in file order."""
    r = _Reader(buf, 0, size, where)
    while r.pos < r.end:
        field, wire = r.key()
        if field != 1 or wire != 2:
            r.fail(f"unexpected top-level field {field} (wire type {wire})")
        vs, ve = r.length()
        v = _Reader(buf, vs, ve, where)
        tag, tensor = None, None
        while v.pos < v.end:
            f, w = v.key()
            if f == 1 and w == 2:
                s, e = v.length()
                tag = _text(buf, s, e, v, "parameter name", MAX_TAG_BYTES)
            elif f == 2 and w == 2:
                tensor = v.length()
            elif f == 3 and w == 2:
                v.fail(f"entry {tag!r} is a MindSpore map parameter, which DVT checkpoints never hold")
            else:
                v.skip(w)
        if tag is None or tensor is None:
            v.fail("entry without a name or a tensor")
        yield (tag, *_parse_tensor(buf, tensor[0], tensor[1], f"{where}: entry {tag!r}"))


def _element_count(dims, where: str, tag: str) -> int:
    n = 1
    for d in dims:
        if d < 0:
            raise CheckpointError(f"{where}: entry {tag!r} has a negative dimension in {list(dims)}")
        n *= d
        if n > MAX_ELEMENTS:
            raise CheckpointError(f"{where}: entry {tag!r} claims {list(dims)}: more than {MAX_ELEMENTS} elements")
    return n


def is_ckpt(head: bytes) -> bool:
    """True when ``head`` (the first bytes of a file) starts like a MindSpore checkpoint entry."""
    if len(head) < 4 or head[0] != 0x0A:
        return False
    r = _Reader(head, 1, len(head), "")
    try:
        r.varint()
        return r.pos < len(head) and head[r.pos] == 0x0A  # Value.tag comes first
    except CheckpointError:
        return False


def read_ckpt(path: Union[str, os.PathLike]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, strings)`` of a ``.ckpt``: tensors as owned numpy arrays, ``append_dict`` strings as str.

    Raises :class:`CheckpointError` for a truncated or malformed file, an entry whose content length
    differs from ``prod(dims) * itemsize``, an unknown dtype, a repeated name or a failed CRC.
    """

    where = os.fspath(path)
    # read(), not mmap: a file truncated while it is read gives fewer bytes (an error below), never SIGBUS
    buf = read_bytes(where, "checkpoint", CheckpointError)
    size = len(buf)
    if size == 0:
        raise CheckpointError(f"{where} is empty, not a checkpoint")
    end = size
    if size >= 17 and buf[size - 17:size - 10] == _CRC_MARK:
        end = size - 17
        want = int.from_bytes(buf[size - 10:size], "big")
        if binascii.crc32(memoryview(buf)[:end]) != want:
            raise CheckpointError(f"{where}: CRC mismatch; the file is damaged")
    return _decode(buf, end, where)


def _decode(buf, size: int, where: str):
    tensors: dict[str, np.ndarray] = {}
    strings: dict[str, str] = {}
    pending = None  # (tag, dims, dtype, [(start, end), ...]) of a tensor whose slices may continue

    def finish(p):
        tag, dims, dtype, parts = p
        if tag in tensors or tag in strings:
            raise CheckpointError(f"{where}: entry {tag!r} appears twice")
        total = sum(e - s for s, e in parts)
        if dtype == "str":
            if total > MAX_STRING_BYTES or total % 4:
                raise CheckpointError(f"{where}: string entry {tag!r} of {total} bytes is malformed or too long")
            raw = b"".join(bytes(buf[s:e]) for s, e in parts)
            try:
                strings[tag] = raw.decode("utf-32-le").rstrip("\x00")
            except UnicodeDecodeError:
                raise CheckpointError(f"{where}: string entry {tag!r} is not valid UTF-32") from None
            return
        if dtype not in MS_DTYPES and dtype != BFLOAT16:
            raise CheckpointError(f"{where}: entry {tag!r} has dtype {dtype!r}, which this project does not read "
                                  f"(known: {', '.join(MS_DTYPES)})")
        np_dtype = MS_DTYPES.get(dtype, np.dtype("<u2"))  # bfloat16: its bits, widened below
        shape = list(dims)
        if shape == [0] and total == np_dtype.itemsize:
            shape = []  # MindSpore writes a 0-d tensor with dims [0]
        n = _element_count(shape, where, tag)
        if total != n * np_dtype.itemsize:
            raise CheckpointError(f"{where}: entry {tag!r} holds {total} bytes but its dims {list(dims)} of "
                                  f"{dtype} need {n * np_dtype.itemsize}")
        arr = np.empty(n, dtype=np_dtype)
        view = arr.view(np.uint8)
        off = 0
        for s, e in parts:
            view[off:off + e - s] = np.frombuffer(buf, dtype=np.uint8, count=e - s, offset=s)
            off += e - s
        arr = arr.astype(np_dtype.newbyteorder("="), copy=False).reshape(shape)
        if dtype == BFLOAT16:
            arr = bf16_to_float32(arr)
        tensors[tag] = arr

    for count, (tag, dims, dtype, content) in enumerate(_entries(buf, size, where)):
        if count >= MAX_ENTRIES:
            raise CheckpointError(f"{where} holds more than {MAX_ENTRIES} entries; refused")
        if pending is not None and pending[0] == tag and dtype != "str":
            if pending[1] != dims or pending[2] != dtype:
                raise CheckpointError(f"{where}: slices of entry {tag!r} disagree on dims or dtype")
            pending[3].append(content)
            continue
        if pending is not None:
            finish(pending)
        pending = (tag, dims, dtype, [content])
    if pending is not None:
        finish(pending)
    return tensors, strings


# ---- writing ------------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _entry(tag: str, dims, dtype: str, content: bytes) -> bytes:
    tensor = b"".join(_varint(1 << 3 | 0) + _varint(int(d)) for d in dims)
    tensor += _field_bytes(2, dtype.encode()) + _field_bytes(3, content)
    value = _field_bytes(1, tag.encode("utf-8")) + _field_bytes(2, tensor)
    return _field_bytes(1, value)


def ms_dtype_name(dtype) -> str:
    """MindSpore's name of a numpy dtype; CheckpointError for one a ``.ckpt`` cannot hold."""
    dt = np.dtype(dtype)
    for name, d in MS_DTYPES.items():
        if d.kind == dt.kind and d.itemsize == dt.itemsize:
            return name
    raise CheckpointError(f"a MindSpore checkpoint cannot hold dtype {dt}")


def _encoded_entries(tensors: dict, strings: dict | None):
    for name, value in tensors.items():
        a = np.asarray(value)
        kind = ms_dtype_name(a.dtype)
        a = np.require(a, dtype=MS_DTYPES[kind], requirements="C")  # keeps 0-d arrays 0-d
        yield _entry(name, a.shape, kind, a.tobytes())  # a 0-d tensor has no dims, as MindSpore writes it
    for name, text in (strings or {}).items():
        yield _entry(name, [0], "str", str(text).encode("utf-32-le"))


def encode_ckpt(tensors: dict, strings: dict | None = None) -> bytes:
    """The bytes of a ``.ckpt`` holding ``tensors`` (name -> array) and ``strings`` (name -> str)."""
    return b"".join(_encoded_entries(tensors, strings))


def write_ckpt(path: Union[str, os.PathLike], tensors: dict, strings: dict | None = None) -> None:
    """Write a ``.ckpt`` to ``path``, one entry at a time (callers make it atomic: fileio.atomic_write)."""
    with open(path, "wb") as fh:
        for chunk in _encoded_entries(tensors, strings):
            fh.write(chunk)
