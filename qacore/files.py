"""Reading user-named files with one-line errors (`InvalidInputError`) instead of tracebacks."""

from __future__ import annotations

from pathlib import Path

from qacore.errors import InvalidInputError


def read_bytes(path: Path, what: str) -> bytes:
    """The bytes of `path`; `what` names the file in the error ("passage", "SQuAD dataset", ...)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InvalidInputError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{what} path is a directory, not a file: {path}") from None
    except OSError as exc:
        raise InvalidInputError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def read_utf8(path: Path, what: str) -> str:
    """The text of a UTF-8 file; any other encoding is refused (with the offset of the first bad byte)."""
    try:
        return read_bytes(path, what).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{what} file {path} is not valid UTF-8 (byte {exc.start})") from None
