"""Engine calls of several workers run as one batch in the engine process (`qa-serve --engine-process`).

Under load each worker sends the engine process small batches (256 callers over 10-14 workers: about seven
questions a call), and the engine process ran them one at a time: a call's host work and its GPU time never
overlapped another's, the GPU was 40-60 % busy, and a worker's call waited ~9 ms behind the others'
(benchmarks/results/serve_h200_contexts.md). The calls waiting at one moment are merged here instead: padded
to the longest sequence, stacked, run as one engine batch, and each caller gets its own rows back, as it
would have had from running alone (a padded column is masked, a padded row is one more window; a GPU engine
may round a row differently in a batch of another shape, as when the worker's own batcher mixes questions).
+41 to +68 % answers/s on the H200 at concurrency 256 (benchmarks/results/serve_h200_merge.md).

This module is the arithmetic of that: what a call and a reply hold and how they are framed (`EngineCall.to_bytes`
and `from_bytes`, `reply_to_bytes` and `result_of_reply`, over `services.engine_wire`), which waiting calls go
together (`take_batch`), and the merge and split. `services.engine_host` does the sockets and threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import numpy as np
from realtime_qa.qacore.engine import Engine, EngineOutputs, EngineSpans
from realtime_qa.qacore.errors import EngineError, EngineFaultError, InvalidInputError, QAError
from realtime_qa.qacore.features import EngineInputs
from realtime_qa.services.engine_wire import WireError, pack, unpack

CallResult: TypeAlias = EngineOutputs | EngineSpans
INFER = "infer"  # logits: `Engine.infer`
SPANS = "spans"  # the device span search: `Engine.infer_spans`
_CALL_KINDS = {INFER: b"I", SPANS: b"S"}
_OPERATIONS = {kind: operation for operation, kind in _CALL_KINDS.items()}
# Errors that cross the socket keep their class (by index), so the batcher and the status mapping see what a local
# engine would have raised; anything else arrives as EngineError.
_ERRORS: tuple[type[QAError], ...] = (EngineError, EngineFaultError, InvalidInputError)
_LOGITS, _SPANS, _ERROR = b"L", b"P", b"E"  # reply kinds


@dataclass(frozen=True)
class EngineCall:
    """One engine call a worker sent: the operation and its arguments, checked for shape."""

    operation: str
    inputs: EngineInputs
    may_start: np.ndarray | None = None  # SPANS only, bool [batch, seq]
    may_end: np.ndarray | None = None
    max_answer_length: int = 0  # SPANS only

    def to_bytes(self) -> bytes:
        """The message `RemoteEngine` sends (`services.engine_wire`)."""
        arrays = [self.inputs.input_ids, self.inputs.segment_ids, self.inputs.input_mask]
        if self.operation == SPANS:
            assert self.may_start is not None and self.may_end is not None
            arrays += [self.may_start, self.may_end]
        return pack(_CALL_KINDS[self.operation], arrays, self.max_answer_length)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> EngineCall:
        """The call in a worker's message; `EngineError` names what is wrong with one that is not a call (the
        engine checks sizes against its limits, `check`)."""
        try:
            message = unpack(data)
        except WireError as exc:
            raise EngineError(f"malformed engine call: {exc}") from None
        operation = _OPERATIONS.get(message.kind)
        if operation is None:
            raise EngineError(f"unknown engine call kind {message.kind.decode('latin-1')!r}")
        arrays = message.arrays
        if len(arrays) != (3 if operation == INFER else 5):
            raise EngineError(f"malformed engine call: {len(arrays)} arrays for {operation}")
        inputs = EngineInputs(*arrays[:3])
        shape = inputs.input_ids.shape
        if not all(array.ndim == 2 and array.dtype.kind in "iu" and array.shape == shape for array in arrays[:3]):
            raise EngineError("malformed engine call: the inputs are not three 2-D integer arrays of one shape")
        if operation == INFER:
            return cls(INFER, inputs)
        may_start, may_end = (array.astype(bool, copy=False) for array in arrays[3:])
        if may_start.shape != shape or may_end.shape != shape:
            raise EngineError(f"span masks must have the inputs' shape {shape}")
        return cls(SPANS, inputs, may_start, may_end, message.number)

    @property
    def rows(self) -> int:
        return int(self.inputs.input_ids.shape[0])

    @property
    def batch_key(self) -> tuple[str, int]:
        """Calls with equal keys can share one engine batch."""
        return self.operation, self.max_answer_length

    def check(self, engine: Engine) -> None:
        """Refuse what `engine` could not run alone (EngineError), so one bad call fails alone, not its batch."""
        engine.check_inputs(self.inputs)

    def run(self, engine: Engine) -> CallResult:
        if self.operation == INFER:
            return engine.infer(self.inputs)
        assert self.may_start is not None and self.may_end is not None
        return engine.infer_spans(self.inputs, self.may_start, self.may_end, self.max_answer_length)


T = TypeVar("T")


def take_batch(waiting: list[T], call_of: Callable[[T], EngineCall], max_rows: int) -> list[T]:
    """Remove and return the calls to run next: the oldest, then every later one with its batch key that still
    fits in `max_rows` windows, in arrival order (a call that does not fit waits for the next batch, so
    nothing is starved: the oldest always goes)."""
    first = call_of(waiting[0])
    key, rows = first.batch_key, first.rows
    taken, kept = [waiting[0]], []
    for item in waiting[1:]:
        call = call_of(item)
        if call.batch_key == key and rows + call.rows <= max_rows:
            taken.append(item)
            rows += call.rows
        else:
            kept.append(item)
    waiting[:] = kept
    return taken


def merge(calls: Sequence[EngineCall]) -> EngineCall:
    """One call for all of `calls` (equal batch keys): their rows stacked in order, padded with zeros (pad id,
    segment 0, mask 0, no span flags) to the longest sequence."""
    if len(calls) == 1:
        return calls[0]
    width = max(call.inputs.seq_len for call in calls)
    inputs = EngineInputs(
        *(_stack([getattr(call.inputs, name) for call in calls], width, np.int32)
          for name in ("input_ids", "segment_ids", "input_mask"))
    )  # fmt: skip
    first = calls[0]
    if first.operation == INFER:
        return EngineCall(INFER, inputs)
    may_start = _stack([call.may_start for call in calls], width, np.bool_)  # type: ignore[misc]
    may_end = _stack([call.may_end for call in calls], width, np.bool_)  # type: ignore[misc]
    return EngineCall(SPANS, inputs, may_start, may_end, first.max_answer_length)


def split(result: CallResult, calls: Sequence[EngineCall]) -> list[CallResult]:
    """Each call's rows of the merged call's `result`, shaped as its own call would have returned them."""
    if len(calls) == 1:
        return [result]
    parts: list[CallResult] = []
    row = 0
    for call in calls:
        rows = slice(row, row + call.rows)
        row += call.rows
        if isinstance(result, EngineOutputs):
            width = call.inputs.seq_len
            parts.append(EngineOutputs(
                np.ascontiguousarray(result.start_logits[rows, :width]),
                np.ascontiguousarray(result.end_logits[rows, :width]),
            ))  # fmt: skip
        else:
            parts.append(EngineSpans(
                result.starts[rows].copy(), result.ends[rows].copy(), result.logits[rows].copy(),
                result.null_logits[rows].copy(),
            ))  # fmt: skip
    return parts


def _stack(arrays: Sequence[np.ndarray], width: int, dtype: type) -> np.ndarray:
    stacked = np.zeros((sum(array.shape[0] for array in arrays), width), dtype)
    row = 0
    for array in arrays:
        stacked[row : row + array.shape[0], : array.shape[1]] = array
        row += array.shape[0]
    return stacked


def reply_to_bytes(reply: tuple[Any, ...]) -> bytes:
    """The message of a reply, ("ok", result) or ("error", class name, message) (`engine_host.run_batch`)."""
    if reply[0] == "ok":
        result = reply[1]
        if isinstance(result, EngineOutputs):
            return pack(_LOGITS, [result.start_logits, result.end_logits])
        return pack(_SPANS, [result.starts, result.ends, result.logits, result.null_logits])
    names = [error.__name__ for error in _ERRORS]
    return pack(_ERROR, number=names.index(reply[1]) if reply[1] in names else 0, text=reply[2])


def result_of_reply(data: bytes | bytearray) -> CallResult:
    """The result in the engine process's reply; an error reply raises its error (`EngineError` if the reply is
    not one)."""
    try:
        message = unpack(data)
    except WireError as exc:
        raise EngineError(f"malformed reply from the engine process: {exc}") from None
    arrays = message.arrays
    if message.kind == _LOGITS and len(arrays) == 2:
        return EngineOutputs(*arrays)
    if message.kind == _SPANS and len(arrays) == 4:
        return EngineSpans(*arrays)
    if message.kind == _ERROR:
        raise _ERRORS[message.number if message.number < len(_ERRORS) else 0](message.text)
    raise EngineError(f"malformed reply from the engine process: kind {message.kind!r} with {len(arrays)} arrays")
