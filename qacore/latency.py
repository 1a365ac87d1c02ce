"""Per-stage latency in nanoseconds: one timings type and one tracker for the service, the answerer and the pipeline.

All clocks are `time.perf_counter_ns` (monotonic, never wall time). A tracker is started when work
arrives, each stage adds its duration, and `finish()` freezes the result into `StageTimings`; a
budget (the 10 ms language-model budget of a voice turn) is checked against the total.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

STAGES = ("queue", "tokenize", "infer", "decode")
LANGUAGE_MODEL_BUDGET_NS = 10_000_000  # the QA model's share of a voice turn's latency budget


@dataclass(frozen=True)
class StageTimings:
    """Where one request's time went, in nanoseconds; `total_ns` covers everything, stages included."""

    queue_ns: int = 0  # waiting for the batcher to run the request's windows
    tokenize_ns: int = 0  # question (and passage, unless cached) tokenization and windowing
    infer_ns: int = 0  # engine calls that carried the request's windows
    decode_ns: int = 0  # span search over the logits
    total_ns: int = 0  # arrival to answer

    def over_budget(self, budget_ns: int = LANGUAGE_MODEL_BUDGET_NS) -> bool:
        return self.total_ns > budget_ns

    def as_dict(self) -> dict[str, int]:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def stage_ns(self, stage: str) -> int:
        """The duration of one of `STAGES` or "total"."""
        value: int = getattr(self, f"{stage}_ns")
        return value


class LatencyTracker:
    """Accumulates stage durations for one unit of work (a request, or one pipeline turn).

    Stages may repeat (a long passage runs several engine calls); durations of the same stage add up.
    """

    def __init__(self, budget_ns: int = LANGUAGE_MODEL_BUDGET_NS, start_ns: int | None = None) -> None:
        self.budget_ns = budget_ns
        self.start_ns = time.perf_counter_ns() if start_ns is None else start_ns
        self.stages: dict[str, int] = {}
        self._end_ns: int | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block as stage `name` (counted even when the block raises)."""
        begin = time.perf_counter_ns()
        try:
            yield
        finally:
            self.add(name, time.perf_counter_ns() - begin)

    def add(self, name: str, duration_ns: int) -> None:
        self.stages[name] = self.stages.get(name, 0) + max(0, int(duration_ns))

    @property
    def elapsed_ns(self) -> int:
        end = self._end_ns if self._end_ns is not None else time.perf_counter_ns()
        return end - self.start_ns

    @property
    def remaining_ns(self) -> int:
        """Budget left (negative once over)."""
        return self.budget_ns - self.elapsed_ns

    def over_budget(self) -> bool:
        return self.elapsed_ns > self.budget_ns

    def finish(self) -> StageTimings:
        """Stop the clock (once; later calls return the same total) and return the timings."""
        if self._end_ns is None:
            self._end_ns = time.perf_counter_ns()
        return StageTimings(
            queue_ns=self.stages.get("queue", 0),
            tokenize_ns=self.stages.get("tokenize", 0),
            infer_ns=self.stages.get("infer", 0),
            decode_ns=self.stages.get("decode", 0),
            total_ns=self._end_ns - self.start_ns,
        )
