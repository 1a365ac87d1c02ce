"""Engine calls of several workers run as one batch in the engine process (`qa-serve --engine-process`).

Under load each worker sends the engine process small batches (256 callers over 10-14 workers: about seven
questions a call), and the engine process ran them one at a time: a call's host work and its GPU time never
overlapped another's, the GPU was 40-60 % busy, and a worker's call waited ~9 ms behind the others'
(benchmarks/results/serve_h200_contexts.md). The calls waiting at one moment are merged here instead: padded
to the longest sequence, stacked, run as one engine batch, and each caller gets its own rows back, as it
would have had from running alone (a padded column is masked, a padded row is one more window; a GPU engine
may round a row differently in a batch of another shape, as when the worker's own batcher mixes questions).
+41 to +68 % answers/s on the H200 at concurrency 256 (benchmarks/results/serve_h200_merge.md).

This module is the arithmetic of that: what a call message must hold (`EngineCall.parse`), which waiting calls
go together (`take_batch`), and the merge and split. `services.engine_host` does the sockets and threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import numpy as np
from realtime_qa.qacore.engine import Engine, EngineOutputs, EngineSpans
from realtime_qa.qacore.errors import EngineError
from realtime_qa.qacore.features import EngineInputs

CallResult: TypeAlias = EngineOutputs | EngineSpans
INFER = "infer"  # logits: `Engine.infer`
SPANS = "spans"  # the device span search: `Engine.infer_spans`


@dataclass(frozen=True)
class EngineCall:
    """One engine call a worker sent: the operation and its arguments, checked for shape."""

    operation: str
    inputs: EngineInputs
    may_start: np.ndarray | None = None  # SPANS only, bool [batch, seq]
    may_end: np.ndarray | None = None
    max_answer_length: int = 0  # SPANS only

    @classmethod
    def parse(cls, message: Any) -> EngineCall:
        """A call from its message, `(operation, arguments)` as `RemoteEngine` sends it; `EngineError` names what
        is wrong with a message that is not one (the engine checks sizes against its limits, `check`)."""
        try:
            operation, arguments = message
            if operation == INFER:
                (inputs,) = arguments
                call = cls(INFER, inputs)
            elif operation == SPANS:
                inputs, may_start, may_end, max_answer_length = arguments
                call = cls(
                    SPANS, inputs, np.asarray(may_start, bool), np.asarray(may_end, bool), int(max_answer_length)
                )
            else:
                raise EngineError(f"unknown engine call {operation!r}")
        except (TypeError, ValueError) as exc:
            raise EngineError(f"malformed engine call: {exc}") from None
        if not isinstance(call.inputs, EngineInputs) or not all(
            isinstance(array, np.ndarray) and array.ndim == 2 and array.dtype.kind in "iu"
            for array in (call.inputs.input_ids, call.inputs.segment_ids, call.inputs.input_mask)
        ):  # fmt: skip
            raise EngineError("malformed engine call: the inputs are not three 2-D integer arrays")
        shape = call.inputs.input_ids.shape
        if call.operation == SPANS and (call.may_start.shape != shape or call.may_end.shape != shape):  # type: ignore[union-attr]
            raise EngineError(f"span masks must have the inputs' shape {shape}")
        return call

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
