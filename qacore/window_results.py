"""From a batch of windows to one question's answer: the engine call and the per-question results table.

An engine either returns two logit rows per window (every backend) or, where it searches answer spans on
the device (`Engine.span_search_limits`, the torch engine), a few span candidates per window. This module
holds the one rule for choosing between them and the one way each is run, gathered and decoded, so the
gRPC service's batcher answers exactly as `QuestionAnswerer` (`qa-eval`, `qa-assistant`) does:

* `span_search_length`: the longest answer to search on the device for a decoder config, or None (decode
  logits on the CPU with `qacore.decoding.decode`, the vectorized numpy search);
* `infer_batch`: one padded engine call for a batch of windows, either form; `launch_batch` starts the span search
  form without waiting, where the engine `launches_spans` (the caller polls);
* `results_table` / `scatter_results`: one question's rows (a `LogitsTable` or a `SpansTable`), filled batch by
  batch in any order, or `whole_results` where one batch holds them all; `decode_results` turns a complete table
  into the `Prediction`;
* `warm_span_search`: run the device span search once per padded shape, so no request pays for a capture.

Pure functions and numpy, no asyncio (the batcher adds the scheduling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from realtime_qa.qacore.batching import FilledRows, LogitsTable, pad_batch, scatter_rows
from realtime_qa.qacore.decoding import DecoderConfig, Prediction, decode, decode_spans, span_masks, uses_device_spans
from realtime_qa.qacore.engine import WARMUP_TOKEN_ID, Engine, EngineOutputs, EngineSpans, PendingSpans
from realtime_qa.qacore.features import EngineInputs, Features, Window

__all__ = [
    "BatchResult",
    "ResultsTable",
    "SpansTable",
    "decode_results",
    "infer_batch",
    "launch_batch",
    "results_table",
    "scatter_results",
    "span_search_length",
    "warm_span_search",
    "whole_results",
]

BatchResult: TypeAlias = EngineOutputs | EngineSpans  # what one engine call returns for a padded batch
SEQUENCE_STEP = 64  # the torch engine pads sequences to multiples of this (its CUDA-graph buckets)


def span_search_length(engine: Engine, config: DecoderConfig) -> int | None:
    """The longest answer (tokens) the engine searches on the device for `config`; None when the answer is
    decoded from logits on the CPU (the engine has no span search, or `config` asks for more than it keeps)."""
    return config.max_answer_length if uses_device_spans(engine, config) else None


def infer_batch(
    engine: Engine, windows: Sequence[Window], pad_id: int, span_length: int | None
) -> tuple[BatchResult, int]:
    """One engine call for `windows` padded to the longest: the device span search for answers of at most
    `span_length` tokens, or logits (span_length None). Returns the result and the padded length."""
    inputs = pad_batch(windows, pad_id)
    if span_length is None:
        return engine.infer(inputs), inputs.seq_len
    may_start, may_end = span_masks(windows, inputs.seq_len)
    return engine.infer_spans(inputs, may_start, may_end, span_length), inputs.seq_len


def launch_batch(engine: Engine, windows: Sequence[Window], pad_id: int, span_length: int) -> tuple[PendingSpans, int]:
    """`infer_batch`'s span search started on the device and not waited for (`Engine.launch_spans`); returns the
    pending search and the padded length."""
    inputs = pad_batch(windows, pad_id)
    may_start, may_end = span_masks(windows, inputs.seq_len)
    return engine.launch_spans(inputs, may_start, may_end, span_length), inputs.seq_len


@dataclass(eq=False)
class SpansTable(FilledRows):
    """The device span search's rows of one question's windows (submission order), filled as batches finish."""

    starts: np.ndarray  # int32 [windows, k]
    ends: np.ndarray  # int32 [windows, k]
    logits: np.ndarray  # float32 [windows, k]
    null_logits: np.ndarray  # float32 [windows]
    filled: np.ndarray  # bool [windows]

    @classmethod
    def for_windows(cls, count: int, spans_per_window: int) -> SpansTable:
        if count < 1:
            raise ValueError("no windows")
        shape = (count, spans_per_window)
        return cls(
            np.full(shape, -1, np.int32),
            np.full(shape, -1, np.int32),
            np.full(shape, -np.inf, np.float32),
            np.zeros(count, np.float32),
            np.zeros(count, bool),
        )

    def spans(self) -> EngineSpans:
        return EngineSpans(self.starts, self.ends, self.logits, self.null_logits)


ResultsTable: TypeAlias = LogitsTable | SpansTable


def results_table(windows: Sequence[Window], span_length: int | None, spans_per_window: int) -> ResultsTable:
    """An empty table for one question's windows: spans rows when its windows run the device span search."""
    if span_length is None:
        return LogitsTable.for_windows(windows)
    return SpansTable.for_windows(len(windows), spans_per_window)


def scatter_results(
    table: ResultsTable,
    rows: Sequence[int],
    widths: Sequence[int],
    result: BatchResult,
    batch_rows: Sequence[int],
) -> None:
    """Copy batch row `batch_rows[i]` of `result` into `table` row `rows[i]` (`widths[i]`: the window's length)."""
    if isinstance(table, LogitsTable):
        if not isinstance(result, EngineOutputs):
            raise TypeError("a logits table takes logits, not spans")
        scatter_rows(table, rows, widths, result.start_logits, result.end_logits, batch_rows)
        return
    if not isinstance(result, EngineSpans):
        raise TypeError("a spans table takes the device span search's spans, not logits")
    keep = table.starts.shape[1]
    if result.starts.shape[1] != keep:
        raise ValueError(f"the engine returned {result.starts.shape[1]} spans per window, the table holds {keep}")
    target, source = np.asarray(rows), np.asarray(batch_rows)
    table.starts[target] = result.starts[source]
    table.ends[target] = result.ends[source]
    table.logits[target] = result.logits[source]
    table.null_logits[target] = result.null_logits[source]
    table.filled[target] = True


def whole_results(result: BatchResult, first: int, count: int, spans_per_window: int) -> SpansTable | None:
    """One question's complete table when all its `count` windows ran in one batch, as batch rows `first` to
    `first + count - 1` in submission order: views of the device span search's rows, no table filled row by row
    (most questions: one window, one batch). None for logits, whose rows go into a table padded with -inf
    (`scatter_results`), and for spans of an unexpected width (`scatter_results` refuses them)."""
    if not isinstance(result, EngineSpans) or result.starts.shape[1] != spans_per_window:
        return None
    rows = slice(first, first + count)
    filled = np.ones(count, bool)
    return SpansTable(result.starts[rows], result.ends[rows], result.logits[rows], result.null_logits[rows], filled)


def decode_results(features: Features, table: ResultsTable, config: DecoderConfig) -> Prediction:
    """The answer from one question's complete table (rows in `features.windows` order)."""
    if isinstance(table, SpansTable):
        return decode_spans(features, table.spans(), config)
    return decode(features, table.start, table.end, config)


def span_search_shapes(engine: Engine) -> list[tuple[int, int]]:
    """(batch, sequence) shapes that cover every padded shape of an engine that pads batches to powers of two
    and sequences to multiples of SEQUENCE_STEP (the torch engine's CUDA-graph buckets), largest last."""
    meta = engine.meta
    batches = {meta.max_batch_size, *(1 << power for power in range(meta.max_batch_size.bit_length()))}
    lengths = {*meta.sequence_lengths, *range(SEQUENCE_STEP, meta.max_seq_length, SEQUENCE_STEP)}
    return [(batch, seq) for batch in sorted(b for b in batches if b <= meta.max_batch_size) for seq in sorted(lengths)]


def warm_span_search(engine: Engine, max_answer_length: int) -> int:
    """Run the device span search once per padded shape (a CUDA-graph engine captures each now, not on a
    request); returns the number of calls (0: the engine has no span search)."""
    limits = engine.span_search_limits()
    if limits is None:
        return 0
    length = min(max_answer_length, limits[1])
    token = min(WARMUP_TOKEN_ID, engine.meta.model_config.vocab_size - 1)
    shapes = span_search_shapes(engine)
    for batch, seq in shapes:
        inputs = EngineInputs(
            np.full((batch, seq), token, np.int32), np.zeros((batch, seq), np.int32), np.ones((batch, seq), np.int32)
        )
        may = np.zeros((batch, seq), bool)
        may[:, 1:] = True
        engine.infer_spans(inputs, may, may, length)
    return len(shapes)
