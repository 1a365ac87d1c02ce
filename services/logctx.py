"""Request ids in every log line: a context variable set per request and a logging filter that reads it.

asyncio copies the context into each task, so everything a request's task logs carries its id;
threads started with `asyncio.to_thread` inherit it too.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

REQUEST_ID_HEADER = "x-request-id"
NO_REQUEST = "-"
MAX_REQUEST_ID_CHARS = 128
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default=NO_REQUEST)


def escape_log_text(text: str, limit: int = 200) -> str:
    """User text made safe for one log line: control characters (newlines, ANSI escapes) escaped as
    `\\n`, `\\x1b`..., and anything past `limit` characters cut with a note of the full length.

    The one helper for every piece of caller-supplied text that reaches a log (request ids, model ids,
    passage ids), so no caller can forge or split log lines.
    """
    cut = text[:limit]
    if not cut.isprintable():
        cut = "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in cut)
    if len(text) > limit:
        cut += f"...({len(text):,} chars)"
    return cut


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def current_request_id() -> str:
    return request_id_var.get()


@contextmanager
def request_context(request_id: str) -> Iterator[str]:
    """Log lines inside the block carry `request_id`."""
    token = request_id_var.set(request_id)
    try:
        yield request_id
    finally:
        request_id_var.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (the current request's id, or "-") so formats can print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr with the request id in every line (idempotent: replaces handlers it added before)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_qa_request_ids", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    handler._qa_request_ids = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
