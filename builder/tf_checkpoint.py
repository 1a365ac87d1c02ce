"""Reading TensorFlow checkpoints (the tensor bundle format, V2) without TensorFlow.

A checkpoint `model.ckpt-N` is an index file `model.ckpt-N.index` and data shards
`model.ckpt-N.data-SSSSS-of-NNNNN`. The index is a LevelDB-format table (an SSTable): keys are
variable names, values are serialised `BundleEntryProto`s (dtype, shape, shard, offset, size),
and the empty key holds the `BundleHeaderProto` (number of shards, endianness). The data shards are
raw tensor bytes at those offsets. The few protobuf fields needed are decoded by hand here.

Formats: leveldb/doc/table_format.md, tensorflow/core/protobuf/tensor_bundle.proto,
tensorflow/core/framework/{types,tensor_shape}.proto.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from realtime_qa.qacore.errors import CheckpointError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic
BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c
NO_COMPRESSION = 0
HEADER_KEY = b""

# tensorflow DataType enum -> numpy dtype (the types a BERT checkpoint can hold)
TF_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.float64),
    3: np.dtype(np.int32),
    4: np.dtype(np.uint8),
    5: np.dtype(np.int16),
    6: np.dtype(np.int8),
    9: np.dtype(np.int64),
    10: np.dtype(np.bool_),
    14: np.dtype(np.uint16),  # bfloat16: widened to float32 below
    19: np.dtype(np.float16),
}
DT_BFLOAT16 = 14


@dataclass(frozen=True)
class BundleEntry:
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    sliced: bool


def data_files(prefix: Path) -> tuple[Path, ...]:
    """The data shards a checkpoint's header names, each checked to exist."""
    header, _ = read_index(index_path(prefix))
    shards = tuple(shard_path(prefix, shard, header["num_shards"]) for shard in range(header["num_shards"]))
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"missing TensorFlow data shard {shard.name}")
    return shards


def read_tf_checkpoint(prefix: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint at `prefix` (e.g. `dir/model.ckpt-8144`) by variable name."""
    header, entries = read_index(index_path(prefix))
    byte_order: Literal["<", ">"] = "<" if header["endianness"] == 0 else ">"
    tensors: dict[str, np.ndarray] = {}
    shards: dict[int, np.memmap] = {}
    for name, entry in entries.items():
        if entry.sliced:
            raise CheckpointError(f"TensorFlow variable {name} is partitioned into slices; re-save it unpartitioned")
        if entry.dtype not in TF_DTYPES:
            continue  # strings and other non-numeric state (e.g. saved iterators) are not model weights
        if entry.shard_id not in shards:
            path = shard_path(prefix, entry.shard_id, header["num_shards"])
            if not path.is_file():
                raise CheckpointError(f"missing TensorFlow data shard {path.name}")
            shards[entry.shard_id] = np.memmap(path, dtype=np.uint8, mode="r")
        data = shards[entry.shard_id]
        dtype = TF_DTYPES[entry.dtype].newbyteorder(byte_order)
        count = int(np.prod(entry.shape, dtype=np.int64))
        if entry.size != count * dtype.itemsize or entry.offset + entry.size > data.shape[0]:
            raise CheckpointError(
                f"TensorFlow variable {name}: {entry.size} bytes at {entry.offset} "
                f"do not hold shape {list(entry.shape)}"
            )
        array = np.frombuffer(data, dtype=dtype, count=count, offset=entry.offset).reshape(entry.shape)
        if entry.dtype == DT_BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = np.array(array, dtype=array.dtype.newbyteorder("="))
    return tensors


def index_path(prefix: Path) -> Path:
    return prefix.parent / (prefix.name + ".index")


def shard_path(prefix: Path, shard: int, num_shards: int) -> Path:
    return prefix.parent / f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}"


def read_index(path: Path) -> tuple[dict[str, int], dict[str, BundleEntry]]:
    """The bundle header and the entries of every variable in an index file."""
    if not path.is_file():
        raise CheckpointError(f"TensorFlow checkpoint index not found: {path}")
    table = read_table(path.read_bytes(), path.name)
    if HEADER_KEY not in table:
        raise CheckpointError(f"{path.name} has no bundle header: not a TensorFlow V2 checkpoint")
    header_fields = decode_message(table.pop(HEADER_KEY))
    header = {
        "num_shards": int(first(header_fields, 1, 1)),
        "endianness": int(first(header_fields, 2, 0)),
    }
    if header["num_shards"] < 1:
        raise CheckpointError(f"{path.name}: bundle header names {header['num_shards']} shards")
    entries = {}
    for key, value in table.items():
        name = key.decode("utf-8", errors="replace")
        entries[name] = decode_entry(value, name)
    return header, entries


def decode_entry(value: bytes, name: str) -> BundleEntry:
    fields = decode_message(value)
    shape: tuple[int, ...] = ()
    shape_bytes = first(fields, 2, b"")
    if shape_bytes:
        shape_fields = decode_message(bytes(shape_bytes))
        if first(shape_fields, 3, 0):
            raise CheckpointError(f"TensorFlow variable {name} has unknown rank")
        shape = tuple(int(first(decode_message(bytes(dim)), 1, 0)) for dim in shape_fields.get(2, []))
    return BundleEntry(
        dtype=int(first(fields, 1, 0)),
        shape=shape,
        shard_id=int(first(fields, 3, 0)),
        offset=int(first(fields, 4, 0)),
        size=int(first(fields, 5, 0)),
        sliced=bool(fields.get(7)),
    )


# ---------------------------------------------------------------------------------------------- SSTable


def read_table(data: bytes, where: str) -> dict[bytes, bytes]:
    """All key/value pairs of a LevelDB table held in `data`."""
    if len(data) < FOOTER_SIZE:
        raise CheckpointError(f"{where} is too short to be a TensorFlow checkpoint index")
    footer = data[-FOOTER_SIZE:]
    (magic,) = struct.unpack("<Q", footer[-8:])
    if magic != TABLE_MAGIC:
        raise CheckpointError(f"{where} is not a TensorFlow checkpoint index (bad table magic)")
    _metaindex, position = read_handle(footer, 0)
    index_handle, _ = read_handle(footer, position)
    table: dict[bytes, bytes] = {}
    for _last_key, handle_bytes in block_entries(read_block(data, index_handle, where), where):
        handle, _ = read_handle(handle_bytes, 0)
        table.update(block_entries(read_block(data, handle, where), where))
    return table


def read_handle(data: bytes, position: int) -> tuple[tuple[int, int], int]:
    offset, position = read_varint(data, position)
    size, position = read_varint(data, position)
    return (offset, size), position


def read_block(data: bytes, handle: tuple[int, int], where: str) -> bytes:
    offset, size = handle
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(data):
        raise CheckpointError(f"{where} is truncated (block at {offset} runs past the end)")
    compression = data[end]
    if compression != NO_COMPRESSION:
        raise CheckpointError(f"{where} uses compressed blocks (type {compression}), which are not supported")
    return data[offset:end]


def block_entries(block: bytes, where: str) -> list[tuple[bytes, bytes]]:
    """Entries of one block: keys share prefixes with the previous key (restart points reset that)."""
    if len(block) < 4:
        raise CheckpointError(f"{where} has a malformed block")
    (num_restarts,) = struct.unpack("<I", block[-4:])
    limit = len(block) - 4 * (num_restarts + 1)
    if limit < 0:
        raise CheckpointError(f"{where} has a malformed block (restart array)")
    entries = []
    key = b""
    position = 0
    while position < limit:
        shared, position = read_varint(block, position)
        unshared, position = read_varint(block, position)
        value_length, position = read_varint(block, position)
        if shared > len(key) or position + unshared + value_length > limit:
            raise CheckpointError(f"{where} has a malformed block entry")
        key = key[:shared] + block[position : position + unshared]
        position += unshared
        entries.append((key, block[position : position + value_length]))
        position += value_length
    return entries


# ---------------------------------------------------------------------------------------------- protobuf


def read_varint(data: bytes, position: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise CheckpointError("malformed varint in TensorFlow checkpoint index")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def decode_message(data: bytes) -> dict[int, list[int | bytes]]:
    """Protobuf wire format -> {field number: [values]} (varints as int, length-delimited as bytes)."""
    fields: dict[int, list[int | bytes]] = {}
    position = 0
    while position < len(data):
        tag, position = read_varint(data, position)
        number, wire_type = tag >> 3, tag & 7
        value: int | bytes
        if wire_type == 0:
            value, position = read_varint(data, position)
        elif wire_type == 1:
            (value,) = struct.unpack_from("<Q", data, position)
            position += 8
        elif wire_type == 2:
            length, position = read_varint(data, position)
            value = data[position : position + length]
            position += length
        elif wire_type == 5:
            (value,) = struct.unpack_from("<I", data, position)
            position += 4
        else:
            raise CheckpointError(f"unsupported protobuf wire type {wire_type} in TensorFlow checkpoint index")
        fields.setdefault(number, []).append(value)
    return fields


def first(fields: dict[int, list[int | bytes]], number: int, default: int | bytes) -> int | bytes:
    values = fields.get(number)
    return values[0] if values else default
