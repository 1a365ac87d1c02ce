"""The engine process's messages as bytes: a kind, one integer, a short text and a few numpy arrays, no pickle.

Engine calls and their replies crossed the worker-engine socket pickled (`Connection.send`). In the engine
process one thread reads, runs and answers every worker's calls in turn, and under load on the H200 it spent
~20 % of its time pickling replies and unpickling calls (py-spy, benchmarks/results/serve_h200_wire.md). Framed
here, on the CPU box a call of 7 windows costs 5 us to write and 11 us to read (33 us pickled), a reply 4 + 7 us
(30 us), the arrays are read in place from the received buffer, and a call is never unpickled.

    kind     1 byte   what the message is (the caller's business: a call's operation, a reply's status)
    number   u32      one integer (a call's max answer length, an error's class)
    text     u32      length of the UTF-8 text that follows the array headers
    arrays   u8       count, then per array: dtype code (1 byte), ndims (1 byte), each dimension (u32)
    then the text, then each array's bytes (C order, little-endian), in order, and nothing after them.

`unpack` checks every length against the message's size, so a short, long or garbled message is a `WireError`
that says what is wrong, never an array read past its buffer.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_HEADER = struct.Struct("<cIIB")
_ARRAY = struct.Struct("<cB")
MAX_NDIM = 4
_SHAPES = [struct.Struct(f"<{ndim}I") for ndim in range(MAX_NDIM + 1)]
_DTYPES = {
    b"?": np.dtype(np.bool_),
    b"i": np.dtype("<i4"),
    b"l": np.dtype("<i8"),
    b"e": np.dtype("<f2"),
    b"f": np.dtype("<f4"),
    b"d": np.dtype("<f8"),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class WireError(ValueError):
    """A message that is not one this module wrote."""


@dataclass(frozen=True)
class Message:
    kind: bytes
    number: int
    text: str
    arrays: tuple[np.ndarray, ...]


def pack(kind: bytes, arrays: Sequence[np.ndarray] = (), number: int = 0, text: str = "") -> bytes:
    """One message; ValueError for what the framing cannot hold: arrays of another dtype than bool, int32/64 or
    float16/32/64, a `number` outside u32, a kind that is not one byte."""
    encoded = text.encode("utf-8", "replace")
    try:
        parts = [_HEADER.pack(kind, number, len(encoded), len(arrays))]
    except struct.error as exc:
        raise ValueError(f"cannot frame the header: {exc}") from None
    for array in arrays:
        code = _CODES.get(array.dtype)
        if code is None or array.ndim > MAX_NDIM:
            raise ValueError(f"cannot frame a {array.ndim}-D {array.dtype} array")
        parts.append(_ARRAY.pack(code, array.ndim) + _SHAPES[array.ndim].pack(*array.shape))
    parts.append(encoded)
    parts.extend(np.ascontiguousarray(array).tobytes() for array in arrays)
    return b"".join(parts)


def unpack(data: bytes | bytearray) -> Message:
    """The message in `data`; its arrays are views of `data` (writable when `data` is a bytearray)."""
    size = len(data)
    try:
        kind, number, text_length, count = _HEADER.unpack_from(data, 0)
        offset = _HEADER.size
        layouts: list[tuple[np.dtype[Any], tuple[int, ...]]] = []
        for _ in range(count):
            code, ndim = _ARRAY.unpack_from(data, offset)
            dtype = _DTYPES.get(code)
            if dtype is None:
                raise WireError(f"array {len(layouts)} has an unknown dtype code {code!r}")
            if ndim > MAX_NDIM:
                raise WireError(f"array {len(layouts)} has {ndim} dimensions (at most {MAX_NDIM})")
            shape = _SHAPES[ndim].unpack_from(data, offset + _ARRAY.size)
            offset += _ARRAY.size + 4 * ndim
            layouts.append((dtype, shape))
    except struct.error:
        raise WireError(f"message of {size} bytes is shorter than its headers") from None
    text = ""
    if text_length:
        if offset + text_length > size:
            raise WireError(f"message of {size} bytes is shorter than its text")
        try:
            text = bytes(data[offset : offset + text_length]).decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("message text is not UTF-8") from None
        offset += text_length
    arrays = []
    for dtype, shape in layouts:
        items = math.prod(shape)
        if offset + items * dtype.itemsize > size:
            raise WireError(f"message of {size} bytes is shorter than its arrays")
        arrays.append(np.frombuffer(data, dtype, items, offset).reshape(shape))
        offset += items * dtype.itemsize
    if offset != size:
        raise WireError(f"message has {size - offset} bytes after its arrays")
    return Message(kind, number, text, tuple(arrays))
