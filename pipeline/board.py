"""The latency board: every turn's report folded into the figures the dashboard and Prometheus show.

The chain's front calls `LatencyBoard.record(report)` once per turn, on the event loop. Each call does
a fixed amount of work per stage row (append to bounded deques, observe a histogram, bump counters)
and never blocks. The same observations feed two views:

* `snapshot()` (served as JSON at `/api/latency` and pushed to the page): **exact** percentiles over a
  sliding window of the last `window` observations of each stage (linear interpolation between the
  two closest ranks, as `numpy.percentile`'s default), over-budget rates over the same window, turns/s
  over the last `rate_window_s` seconds, and lifetime counts and sums.
* `registry` (served as Prometheus text at `/metrics`): lifetime histograms per stage, from which
  Prometheus estimates percentiles by interpolating inside buckets (`histogram_quantile`), and
  lifetime counters. The snapshot's lifetime figures (`count`, `sum_ms`, `over_budget_total`, the
  turn counts by outcome) are exactly the Prometheus `_count`, `_sum` and counter values.

Stages are the chain's stages of `qacore.latency` (`asr`, `qa`, `response`), their nested rows
(`qa.queue`, `qa.tokenize`, `qa.infer`, `qa.decode`, `<stage>.network`) and `turn` (end to end).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from realtime_qa.qacore.latency import (
    CHAIN_STAGES,
    MS,
    QA_SERVER_STAGES,
    SEPARATOR,
    Budgets,
    TurnReport,
    remote_stage_names,
)
from realtime_qa.services.metrics import LATENCY_BUCKETS_S

TURN = "turn"  # the end-to-end row: a turn's total time against the turn budget
OUTCOMES = ("within_budget", "over_budget", "error")
QUANTILES = (50, 95, 99)
WARN_FRACTION = 0.8  # a stage whose p95 reaches 80 % of its budget is shown amber
# Stage latency buckets: the service's buckets plus the chain's default budgets, so that Prometheus can
# count "at or under budget" from the histogram alone.
BUCKETS_S = tuple(
    sorted({*LATENCY_BUCKETS_S, *(ns / 1e9 for ns in Budgets().stages.values()), Budgets().turn_ns / 1e9})
)


def board_stage_names() -> tuple[str, ...]:
    """Rows in display order: each chain stage followed by its nested rows, then `turn`."""
    names: list[str] = []
    for spec in CHAIN_STAGES:
        names += [spec.name, *remote_stage_names(spec.name)]
    return (*names, TURN)


def percentile(ordered: Sequence[int], q: float) -> float:
    """The q-th percentile (0..100) of an ascending sequence, interpolating linearly between ranks."""
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def budget_status(p95_ns: float, p99_ns: float, budget_ns: int | None) -> str:
    """ "over" (red): p95 over budget; "warn" (amber): p95 >= 80 % of it or p99 over; "ok" (green); "none"."""
    if budget_ns is None or math.isnan(p95_ns):
        return "none"
    if p95_ns > budget_ns:
        return "over"
    if p95_ns >= WARN_FRACTION * budget_ns or p99_ns > budget_ns:
        return "warn"
    return "ok"


@dataclass
class _StageWindow:
    """One row's sliding window (durations and over-budget flags) and its lifetime totals."""

    durations: deque[int]
    over: deque[bool]
    budget_ns: int | None = None
    count: int = 0
    sum_ns: int = 0
    over_total: int = 0

    def add(self, duration_ns: int, budget_ns: int | None) -> bool:
        over = budget_ns is not None and duration_ns > budget_ns
        self.durations.append(duration_ns)
        self.over.append(over)
        if budget_ns is not None:
            self.budget_ns = budget_ns
        self.count += 1
        self.sum_ns += duration_ns
        self.over_total += over
        return over


@dataclass(frozen=True)
class BoardConfig:
    window: int = 1000  # observations per stage behind the percentiles and over-budget rates
    recent_turns: int = 60  # turns kept for the timeline
    rate_window_s: float = 10.0  # turns/s is measured over this many seconds
    budgets: Budgets = field(default_factory=Budgets)  # shown until turns bring their session's budgets

    def __post_init__(self) -> None:
        if self.window < 1 or self.recent_turns < 1 or self.rate_window_s <= 0:
            raise ValueError("window, recent_turns and rate_window_s must be positive")


class LatencyBoard:
    """Per-stage sliding-window percentiles, over-budget rates, turns/s and recent turns, plus Prometheus."""

    def __init__(self, config: BoardConfig | None = None, clock_ns: Callable[[], int] = time.perf_counter_ns) -> None:
        self.config = config or BoardConfig()
        self._clock_ns = clock_ns
        self._started_ns = clock_ns()
        self._names = board_stage_names()
        self._order = {name: index for index, name in enumerate(self._names)}
        window = self.config.window
        self._stages = {
            name: _StageWindow(deque(maxlen=window), deque(maxlen=window), self._default_budget(name))
            for name in self._names
        }
        self._recent: deque[TurnReport] = deque(maxlen=self.config.recent_turns)
        self._recent_outcomes: deque[str] = deque(maxlen=window)
        self._recent_over: deque[bool] = deque(maxlen=window)  # any stage or the turn over budget, errors too
        self._finished_at: deque[int] = deque(maxlen=window)
        self._outcomes = dict.fromkeys(OUTCOMES, 0)
        self._info: dict[str, str] = {}
        self._listeners: list[Callable[[], None]] = []
        self.version = 0  # bumped on every recorded turn (and info change)

        self.registry = CollectorRegistry()
        self._latency = Histogram(
            "assistant_stage_latency_seconds",
            "Time per conversational turn and stage (asr, qa, response, their nested rows such as qa.infer "
            "and qa.network, and turn: end to end).",
            ["stage"],
            buckets=BUCKETS_S,
            registry=self.registry,
        )
        self._over_budget = Counter(
            "assistant_stage_over_budget",
            "Turns in which a stage (or, for stage=turn, the whole turn) took longer than its budget.",
            ["stage"],
            registry=self.registry,
        )
        self._turns = Counter(
            "assistant_turns",
            "Finished turns by outcome: within_budget, over_budget (any stage or the turn), error.",
            ["outcome"],
            registry=self.registry,
        )
        self._budget = Gauge(
            "assistant_stage_budget_seconds",
            "Budget of each stage and of the turn (of the latest turn's session).",
            ["stage"],
            registry=self.registry,
        )
        # Every series exists from the start (rates start at zero) and is looked up once, not per turn.
        self._latency_of = {name: self._latency.labels(name) for name in self._names}
        budgeted = [name for name in self._names if SEPARATOR not in name]  # chain stages and the turn
        self._over_budget_of = {name: self._over_budget.labels(name) for name in budgeted}
        self._turns_of = {outcome: self._turns.labels(outcome) for outcome in OUTCOMES}
        for name in self._names:
            budget_ns = self._stages[name].budget_ns
            if budget_ns is not None:
                self._budget.labels(name).set(budget_ns / 1e9)

    def _default_budget(self, name: str) -> int | None:
        return self.config.budgets.turn_ns if name == TURN else self.config.budgets.of(name)

    # -- writing -------------------------------------------------------------------------------------

    def record(self, report: TurnReport) -> None:
        """Fold one finished turn in (on the event loop; constant work per stage row, never blocks).

        A stage name outside the latency model is an error (ValueError), never silently dropped; the
        report is then not recorded at all.
        """
        unknown = [span.name for span in report.spans if span.name not in self._order or span.name == TURN]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(map(repr, unknown))}; known: {', '.join(self._names)}")
        for span in report.spans:
            self._observe(span.name, span.duration_ns, span.budget_ns)
        over = self._observe(TURN, report.total_ns, report.turn_budget_ns) or any(s.over_budget for s in report.spans)
        outcome = "error" if report.error is not None else "over_budget" if over else "within_budget"
        self._outcomes[outcome] += 1
        self._turns_of[outcome].inc()
        self._recent_outcomes.append(outcome)
        self._recent_over.append(over)
        self._recent.append(report)
        self._finished_at.append(self._clock_ns())
        self._changed()

    def _observe(self, name: str, duration_ns: int, budget_ns: int | None) -> bool:
        window = self._stages[name]
        if budget_ns is not None and budget_ns != window.budget_ns:
            self._budget.labels(name).set(budget_ns / 1e9)
        over = window.add(duration_ns, budget_ns)
        self._latency_of[name].observe(duration_ns / 1e9)
        if over:
            (self._over_budget_of.get(name) or self._over_budget.labels(name)).inc()
        return over

    def set_info(self, info: dict[str, Any]) -> None:
        """Engine and model facts shown on the page (backend, precision, model id, engine name, ...)."""
        self._info = {str(key): str(value) for key, value in info.items() if value is not None}
        self._changed()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (on the event loop, must not block) after every change."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _changed(self) -> None:
        self.version += 1
        for listener in tuple(self._listeners):
            listener()

    # -- reading -------------------------------------------------------------------------------------

    @property
    def turns_total(self) -> int:
        return sum(self._outcomes.values())

    def turns_per_s(self) -> float:
        """Finished turns per second over the last `rate_window_s` seconds (or since the board started)."""
        now = self._clock_ns()
        span_ns = min(int(self.config.rate_window_s * 1e9), max(1, now - self._started_ns))
        times = list(self._finished_at)
        recent = len(times) - bisect.bisect_left(times, now - span_ns)
        return recent / (span_ns / 1e9)

    def stage_summary(self, name: str) -> dict[str, Any]:
        """One row of the snapshot: window percentiles and over-budget rate, lifetime totals, status."""
        window = self._stages[name]
        ordered = sorted(window.durations)
        p50, p95, p99 = (percentile(ordered, q) for q in QUANTILES)
        parent = name.rpartition(".")[0] or None
        return {
            "name": name,
            "parent": parent,
            "description": "end to end: the user's turn in to the last reply event out"
            if name == TURN
            else _description(name),
            "budget_ms": None if window.budget_ns is None else window.budget_ns / MS,
            "window": len(ordered),
            "p50_ms": _ms(p50),
            "p95_ms": _ms(p95),
            "p99_ms": _ms(p99),
            "max_ms": _ms(ordered[-1]) if ordered else None,
            "mean_ms": _ms(sum(ordered) / len(ordered)) if ordered else None,
            "over_budget_rate": (sum(window.over) / len(window.over))
            if window.budget_ns is not None and ordered
            else None,
            "count": window.count,
            "sum_ms": window.sum_ns / MS,
            "over_budget_total": window.over_total,
            "status": budget_status(p95, p99, window.budget_ns),
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, as the JSON served at `/api/latency` (see docs/dashboard.md)."""
        outcomes = list(self._recent_outcomes)
        stages = [self.stage_summary(name) for name in self._names]
        by_name = {row["name"]: row for row in stages}
        over_statuses = [row["status"] for row in stages if row["status"] != "none"]
        overall = (
            "idle"
            if not outcomes
            else ("over" if "over" in over_statuses else "warn" if "warn" in over_statuses else "ok")
        )
        budgets = {row["name"]: row["budget_ms"] for row in stages if row["budget_ms"] is not None}
        return {
            "version": self.version,
            "uptime_s": round((self._clock_ns() - self._started_ns) / 1e9, 3),
            "info": dict(self._info),
            "status": overall,
            "budgets_ms": budgets,
            "turns": {"total": self.turns_total, **self._outcomes},
            "turns_per_s": round(self.turns_per_s(), 3),
            "window_turns": len(outcomes),
            # Over budget: any stage, or the whole turn, took longer than its budget (failed turns included).
            "over_budget_rate": (sum(self._recent_over) / len(outcomes)) if outcomes else None,
            "error_rate": (sum(o == "error" for o in outcomes) / len(outcomes)) if outcomes else None,
            "turn": by_name[TURN],
            "stages": stages,
            "recent": [_turn_row(report) for report in self._recent],
        }


def _description(name: str) -> str:
    head, _, leaf = name.rpartition(".")
    if not head:
        return CHAIN_STAGES[name].description
    if leaf == "network":
        return f"{head}: client round trip minus the server's own time"
    return f"{head} server: {QA_SERVER_STAGES[leaf].description}"


def _ms(value_ns: float) -> float | None:
    return None if math.isnan(value_ns) else round(value_ns / MS, 4)


def _turn_row(report: TurnReport) -> dict[str, Any]:
    row = report.as_dict()
    row["outcome"] = "error" if report.error is not None else "over_budget" if report.over_budget else "within_budget"
    return row
