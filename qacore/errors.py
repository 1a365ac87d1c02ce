"""Errors the domain raises; the edges (CLI, gRPC) map them to exit codes and status codes."""


class QAError(Exception):
    """Base class of every error this product raises on purpose."""


class InvalidInputError(QAError, ValueError):
    """The caller gave a question, passage or option that cannot be answered (maps to INVALID_ARGUMENT)."""


class EngineError(QAError):
    """An engine file is missing, unreadable or does not match the model it is used with."""


class CheckpointError(QAError):
    """A checkpoint is incomplete or malformed; the message names the missing piece."""


class EngineFaultError(EngineError):
    """An engine ran but returned what no healthy engine returns (NaN or infinite logits): a fault of the
    engine, never an answer or an abstention (maps to INTERNAL)."""
