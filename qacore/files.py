"""Reading user-named files with one-line errors (`InvalidInputError`) instead of tracebacks."""

from __future__ import annotations

import hashlib
from pathlib import Path

from realtime_qa.qacore.errors import InvalidInputError

UTF8_MAX_BYTES_PER_CODE_POINT = 4


def read_bytes(path: Path, what: str, max_bytes: int | None = None) -> bytes:
    """The bytes of `path`; `what` names the file in the error ("passage", "SQuAD dataset", ...).

    With `max_bytes`, reading stops one byte past the limit (so /dev/zero or a huge file costs no
    more memory than the limit) and a longer file is refused.
    """
    try:
        if max_bytes is None:
            return path.read_bytes()
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise InvalidInputError(f"{what} file {path} is larger than the limit of {max_bytes:,} bytes")
        return data
    except FileNotFoundError:
        raise InvalidInputError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{what} path is a directory, not a file: {path}") from None
    except OSError as exc:
        raise InvalidInputError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def read_utf8(path: Path, what: str, max_code_points: int | None = None) -> str:
    """The text of a UTF-8 file; any other encoding is refused (with the offset of the first bad byte).

    With `max_code_points`, at most 4 bytes per code point are read and longer text is refused.
    """
    max_bytes = None if max_code_points is None else UTF8_MAX_BYTES_PER_CODE_POINT * max_code_points
    try:
        text = read_bytes(path, what, max_bytes).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{what} file {path} is not valid UTF-8 (byte {exc.start})") from None
    if max_code_points is not None and len(text) > max_code_points:
        raise InvalidInputError(f"{what} file {path} has {len(text):,} code points; the limit is {max_code_points:,}")
    return text


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
