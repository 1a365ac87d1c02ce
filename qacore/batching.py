"""Window batching, one path for everything that runs windows through an engine: pure functions, no asyncio.

The server's dynamic batcher (`services.batcher`) and the offline answerer (`qacore.answerer`, used by
`qa-eval` and `qa-assistant`) both use these, so the evaluator scores the batching path that is served:

* `length_bucket`: windows within the same multiple of `bucket_tokens` tokens batch together first, so
  little of a batch is padding;
* `plan_batches`: split windows into batches of at most `max_batch_size`, shortest first, grouped by length;
* `pad_batch`: pad a batch of windows into the engine's int32 arrays;
* `LogitsTable` / `scatter_rows`: the logits of one request's windows, filled batch by batch in any order
  and handed out in submission order (columns past a window's length are -inf).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from realtime_qa.qacore.features import EngineInputs, Window, pad_windows


def length_bucket(seq_len: int, bucket_tokens: int) -> int:
    """The bucket of a window of `seq_len` tokens: ceil(seq_len / bucket_tokens)."""
    if bucket_tokens < 1:
        raise ValueError(f"bucket_tokens must be >= 1, got {bucket_tokens}")
    return -(-seq_len // bucket_tokens)


def plan_batches(seq_lens: Sequence[int], max_batch_size: int) -> list[list[int]]:
    """Indices of the windows in each batch: at most `max_batch_size` per batch, windows sorted by length
    (stable, so equal lengths keep their order), so each batch pads to about its own windows' length."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    order = sorted(range(len(seq_lens)), key=lambda index: seq_lens[index])
    return [order[first : first + max_batch_size] for first in range(0, len(order), max_batch_size)]


def pad_batch(windows: Sequence[Window], pad_id: int, seq_len: int | None = None) -> EngineInputs:
    """The engine inputs of one batch: windows padded to the longest (or to `seq_len`)."""
    return pad_windows(list(windows), pad_id, seq_len)


def real_tokens(windows: Sequence[Window]) -> int:
    """Tokens of a batch that are not padding."""
    return sum(window.seq_len for window in windows)


class FilledRows:
    """A per-request table whose rows (one per window) are filled as the batches carrying them finish."""

    filled: np.ndarray  # bool [windows]

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    @property
    def missing(self) -> int:
        return int((~self.filled).sum())


@dataclass(eq=False)
class LogitsTable(FilledRows):
    """The start/end logits of one request's windows (rows in submission order), filled as batches finish."""

    start: np.ndarray  # float32 [windows, width]
    end: np.ndarray
    filled: np.ndarray  # bool [windows]

    @classmethod
    def for_windows(cls, windows: Sequence[Window]) -> LogitsTable:
        if not windows:
            raise ValueError("no windows")
        width = max(window.seq_len for window in windows)
        start = np.full((len(windows), width), -np.inf, dtype=np.float32)
        return cls(start, start.copy(), np.zeros(len(windows), dtype=bool))


def scatter_rows(
    table: LogitsTable,
    rows: Sequence[int],
    widths: Sequence[int],
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    batch_rows: Sequence[int] | None = None,
) -> None:
    """Copy batch row `batch_rows[i]` (default: i) into `table` row `rows[i]`, its first `widths[i]` columns."""
    positions = range(len(rows)) if batch_rows is None else batch_rows
    for row, width, position in zip(rows, widths, positions, strict=True):
        table.start[row, :width] = start_logits[position, :width]
        table.end[row, :width] = end_logits[position, :width]
        table.filled[row] = True
