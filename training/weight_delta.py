"""A model directory as a compact, exact delta against another one of the same shapes (device-call carry).

Why: a device call carries at most 64 MiB, the working tree (with the shipped model, 45 MB) included, so an
earlier model (e.g. the start model that `qa-train abstain` tuned) cannot travel whole beside it. Two float16
exports of one network that differ by a short fine-tuning have the same safetensors headers and nearby values, so
each safetensors file is stored as the difference of its 16-bit words mapped to a monotonic integer order
(a few ULPs for most weights), zigzag-coded and split into byte planes, then xz-compressed: about 8 bits a weight
instead of 16. Files that differ otherwise (config.json) are stored whole; equal files are not stored at all.
`apply_delta` rebuilds the target byte for byte and checks every file's sha256.

    python -m realtime_qa.training.weight_delta encode BASE_DIR TARGET_DIR DELTA.tar.xz
    python -m realtime_qa.training.weight_delta apply BASE_DIR DELTA.tar.xz OUT_DIR
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
SAFETENSORS_SUFFIX = ".safetensors"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _split_safetensors(data: bytes) -> tuple[bytes, bytes]:
    """(header with its 8-byte length, tensor bytes) of a safetensors file."""
    (header_length,) = struct.unpack("<Q", data[:8])
    return data[: 8 + header_length], data[8 + header_length :]


def _monotonic(words: np.ndarray) -> np.ndarray:
    """16-bit words (as int16) -> int32 in float16 order: negatives (sign bit set) below zero, -0 at -1."""
    values = words.astype(np.int32)
    return np.where(values < 0, -(values & 0x7FFF) - 1, values)


def _words(order: np.ndarray) -> np.ndarray:
    """Inverse of `_monotonic`."""
    negative = order < 0
    magnitude = np.where(negative, -(order + 1), order)
    return np.where(negative, magnitude | 0x8000, magnitude).astype(np.uint16).view(np.int16)


def _encode_words(base: bytes, target: bytes) -> bytes:
    difference = _monotonic(np.frombuffer(target, "<i2")) - _monotonic(np.frombuffer(base, "<i2"))
    zigzag = ((difference << 1) ^ (difference >> 31)).astype(np.uint32)  # |difference| < 2^16: 17 bits
    planes = [(zigzag >> shift).astype(np.uint8) for shift in (0, 8, 16)]
    return b"".join(plane.tobytes() for plane in planes)


def _decode_words(base: bytes, planes: bytes) -> bytes:
    count = len(base) // 2
    low, middle, high = (np.frombuffer(planes, np.uint8, count, offset=i * count).astype(np.uint32) for i in range(3))
    zigzag = (low | (middle << 8) | (high << 16)).astype(np.int64)
    difference = (zigzag >> 1) ^ -(zigzag & 1)
    return _words(_monotonic(np.frombuffer(base, "<i2")) + difference.astype(np.int32)).tobytes()


def encode_delta(base_dir: Path, target_dir: Path, out: Path) -> dict[str, dict[str, object]]:
    """Write `out` (tar.xz) from which `apply_delta(base_dir, out, ...)` rebuilds every file of `target_dir`."""
    manifest: dict[str, dict[str, object]] = {}
    members: dict[str, bytes] = {}
    for file in sorted(target_dir.iterdir()):
        if not file.is_file():
            continue
        target = file.read_bytes()
        entry: dict[str, object] = {"sha256": _sha256(target), "bytes": len(target)}
        base_file = base_dir / file.name
        base = base_file.read_bytes() if base_file.is_file() else None
        if base == target:
            entry["how"] = "same"
        elif (
            base is not None
            and file.name.endswith(SAFETENSORS_SUFFIX)
            and len(base) == len(target)
            and _split_safetensors(base)[0] == _split_safetensors(target)[0]
            and len(_split_safetensors(target)[1]) % 2 == 0
        ):
            header, body = _split_safetensors(target)
            entry["how"] = "words"
            entry["base_sha256"] = _sha256(base)
            members[f"{file.name}.header"] = header
            members[f"{file.name}.planes"] = _encode_words(_split_safetensors(base)[1], body)
        else:
            entry["how"] = "whole"
            members[file.name] = target
        manifest[file.name] = entry
    members[MANIFEST] = (json.dumps(manifest, indent=2) + "\n").encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    # The stub allows presets 0-9 only, but tarfile passes the preset on to LZMAFile, which takes PRESET_EXTREME too.
    with tarfile.open(out, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return manifest


def apply_delta(base_dir: Path, delta: Path, out_dir: Path) -> list[Path]:
    """Rebuild the target model of `delta` from `base_dir` into `out_dir`; ValueError if any file's sha256 differs
    from the one recorded (a wrong base, or a damaged delta)."""
    with tarfile.open(delta, "r:xz") as tar:
        members = {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}  # type: ignore[union-attr]
    manifest = json.loads(members[MANIFEST])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, entry in manifest.items():
        if entry["how"] == "same":
            data = (base_dir / name).read_bytes()
        elif entry["how"] == "whole":
            data = members[name]
        else:
            base = (base_dir / name).read_bytes()
            if _sha256(base) != entry["base_sha256"]:
                raise ValueError(f"{base_dir / name} is not the base this delta was made against")
            data = members[f"{name}.header"] + _decode_words(_split_safetensors(base)[1], members[f"{name}.planes"])
        if _sha256(data) != entry["sha256"]:
            raise ValueError(f"rebuilt {name} does not match its recorded sha256")
        (out_dir / name).write_bytes(data)
        written.append(out_dir / name)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in ("encode", "apply"):
        print(__doc__.strip().splitlines()[-2].strip(), file=sys.stderr)
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    if argv[0] == "encode":
        manifest = encode_delta(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        print(json.dumps({name: entry["how"] for name, entry in manifest.items()}))
    else:
        for path in apply_delta(Path(argv[1]), Path(argv[2]), Path(argv[3])):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
