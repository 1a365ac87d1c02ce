"""The service's own failures and the one place where every error becomes a gRPC status code."""

from __future__ import annotations

import grpc
from realtime_qa.qacore.errors import CheckpointError, EngineError, InvalidInputError


class ServiceError(Exception):
    """A failure with a definite gRPC status; `code` says which."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequestError(ServiceError):
    """A request field is missing or out of range (unknown model, option out of range, oversize input)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class UnknownPassageError(ServiceError):
    """A passage_id the server does not hold (never stored, or evicted from the cache)."""

    code = grpc.StatusCode.NOT_FOUND


class UnknownModelError(ServiceError):
    """A model id the server has not loaded (NOT_FOUND where the model is the resource asked for)."""

    code = grpc.StatusCode.NOT_FOUND


class QueueFullError(ServiceError):
    """The batcher's bounded queue cannot take the request's windows now."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExpiredError(ServiceError):
    """The request's deadline passed before its answer was ready; its queued work was dropped."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotServingError(ServiceError):
    """The server (or one model) is warming up or shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class BatchFailedError(ServiceError):
    """The engine call that carried the request's windows failed; every request in that batch gets this."""

    code = grpc.StatusCode.INTERNAL


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and one-line message a client sees for `exc`.

    Unexpected exceptions map to INTERNAL with a generic message: the traceback goes to the server
    log (the caller logs it), never to the client.
    """
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, InvalidInputError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (EngineError, CheckpointError)):
        return grpc.StatusCode.INTERNAL, f"engine failure: {exc}"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the answer was ready"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def is_expected(exc: BaseException) -> bool:
    """Whether `exc` is a failure the service anticipates (logged without traceback)."""
    return isinstance(exc, (ServiceError, InvalidInputError, TimeoutError)) and not isinstance(exc, BatchFailedError)
