"""The engine process's framing (services/engine_wire.py): what is packed is unpacked unchanged, and a message that
is cut, padded or garbled is a WireError that says so, never an array read past its buffer."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from realtime_qa.services.engine_wire import MAX_NDIM, WireError, pack, unpack

ARRAYS = [
    np.arange(12, dtype=np.int32).reshape(3, 4),
    np.array([[True, False, True]]),
    np.array([1.5, -np.inf, np.nan], np.float32),
    np.arange(6, dtype=np.int64).reshape(1, 2, 3),
    np.array([0.25], np.float16),
    np.array(7.0),  # 0-D float64
    np.zeros((0, 5), np.int32),  # an empty batch
]


def test_arrays_number_and_text_come_back_unchanged() -> None:
    message = unpack(pack(b"S", ARRAYS, 4_000_000_000, "EngineError: ✓ ünïcode"))
    assert (message.kind, message.number, message.text) == (b"S", 4_000_000_000, "EngineError: ✓ ünïcode")
    assert len(message.arrays) == len(ARRAYS)
    for got, sent in zip(message.arrays, ARRAYS, strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        np.testing.assert_array_equal(got, sent)


def test_a_non_contiguous_array_is_sent_as_its_values() -> None:
    array = np.arange(20, dtype=np.int32).reshape(4, 5)[:, 1:3]
    (got,) = unpack(pack(b"I", [array])).arrays
    np.testing.assert_array_equal(got, array)


def test_arrays_are_writable_only_over_a_bytearray() -> None:
    data = pack(b"I", ARRAYS[:1])
    assert not unpack(data).arrays[0].flags.writeable
    assert unpack(bytearray(data)).arrays[0].flags.writeable


def test_every_cut_of_a_message_is_refused() -> None:
    data = pack(b"S", ARRAYS, 3, "text")
    for size in range(len(data)):
        with pytest.raises(WireError, match="shorter than its"):
            unpack(data[:size])


def test_bytes_after_the_arrays_are_refused() -> None:
    with pytest.raises(WireError, match=r"^message has 2 bytes after its arrays$"):
        unpack(pack(b"I", ARRAYS[:2]) + b"\0\0")


def test_an_array_header_that_claims_more_than_the_message_holds_is_refused() -> None:
    huge = struct.pack("<cIIB", b"I", 0, 0, 1) + struct.pack("<cB2I", b"f", 2, 2**32 - 1, 2**32 - 1)
    with pytest.raises(WireError, match="shorter than its arrays"):
        unpack(huge)


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (struct.pack("<cB", b"O", 1) + struct.pack("<I", 1), r"array 0 has an unknown dtype code b'O'"),
        (struct.pack("<cB", b"i", MAX_NDIM + 1), f"array 0 has {MAX_NDIM + 1} dimensions"),
    ],
)
def test_an_unknown_dtype_or_too_many_dimensions_are_refused(header: bytes, error: str) -> None:
    with pytest.raises(WireError, match=error):
        unpack(struct.pack("<cIIB", b"I", 0, 0, 1) + header + bytes(64))


def test_text_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(WireError, match="not UTF-8"):
        unpack(struct.pack("<cIIB", b"E", 0, 2, 0) + b"\xff\xfe")


@pytest.mark.parametrize("array", [np.array(["text"]), np.zeros((1,) * (MAX_NDIM + 1), np.int32)])
def test_packing_what_the_framing_cannot_hold_raises(array: np.ndarray) -> None:
    with pytest.raises(ValueError, match="cannot frame"):
        pack(b"I", [array])


@pytest.mark.parametrize("number", [-1, 2**32])
def test_packing_a_number_outside_u32_raises(number: int) -> None:
    with pytest.raises(ValueError, match="cannot frame the header"):
        pack(b"S", number=number)
