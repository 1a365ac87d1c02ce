"""The latency model, defined once: named stages in order, their budgets, trackers, timings and turn reports.

Everything that measures time uses this module: the QA service (per request), the conversational
chain (per turn), the Prometheus metrics, the CLIs, the dashboard and the benchmarks.

Two stage sets exist, one nested inside the other:

* `CHAIN_STAGES`: the stages of one conversational turn, in order: `asr` (end of the user's
  utterance to the final transcript), `qa` (the language model: question in, answer out) and
  `response` (answer to reply text, and audio when asked). Each has a default budget; the QA
  (language-model) budget is 10 ms.
* `QA_SERVER_STAGES`: where a `qa.v1` call spends its time inside the server (`queue`, `tokenize`,
  `infer`, `decode`). These are the fields of `qa.v1.StageTimings`, and appear in a turn report as
  `qa.queue`, `qa.tokenize`, ... under `qa`, next to `qa.network` (client round trip minus server time).

All clocks are `time.perf_counter_ns` (monotonic, never wall time). Unknown stage names are an error,
never silently dropped.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

MS = 1_000_000  # nanoseconds per millisecond
LANGUAGE_MODEL_BUDGET_NS = 10 * MS  # the QA model's share of a voice turn's latency budget
NETWORK = "network"  # child stage of a remote stage: client round trip minus the server's own time
SEPARATOR = "."  # "qa.infer": stage `infer` inside stage `qa`


@dataclass(frozen=True)
class StageSpec:
    """One named stage: what it measures and its default budget (None: no budget of its own)."""

    name: str
    description: str
    budget_ns: int | None = None

    @property
    def parent(self) -> str | None:
        head, sep, _ = self.name.rpartition(SEPARATOR)
        return head if sep else None

    @property
    def leaf(self) -> str:
        return self.name.rpartition(SEPARATOR)[2]


class StageSet:
    """An ordered, immutable collection of stages with lookup by name."""

    def __init__(self, specs: Iterable[StageSpec]) -> None:
        self._specs = tuple(specs)
        self._by_name = {spec.name: spec for spec in self._specs}
        if len(self._by_name) != len(self._specs):
            raise ValueError("stage names must be unique")

    def __iter__(self) -> Iterator[StageSpec]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> StageSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(f"unknown stage {name!r}; known: {', '.join(self.names)}") from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self._specs)

    def default_budgets(self) -> dict[str, int]:
        return {spec.name: spec.budget_ns for spec in self._specs if spec.budget_ns is not None}


QA_SERVER_STAGES = StageSet(
    (
        StageSpec("queue", "waiting in the batcher's queue before the question's windows ran"),
        StageSpec("tokenize", "tokenizing the question (and the passage, unless cached) and cutting windows"),
        StageSpec("infer", "engine calls that carried the question's windows (shared with the batch)"),
        StageSpec("decode", "searching the logits for answer spans"),
    )
)
STAGES = QA_SERVER_STAGES.names  # ("queue", "tokenize", "infer", "decode"): the fields of qa.v1.StageTimings

CHAIN_STAGES = StageSet(
    (
        StageSpec("asr", "end of the user's utterance to the final transcript", 50 * MS),
        StageSpec("qa", "the language model: question in, answer out (client round trip)", LANGUAGE_MODEL_BUDGET_NS),
        StageSpec("response", "answer to reply text (and reply audio when asked)", 50 * MS),
    )
)
TURN_BUDGET_NS = 150 * MS  # default end-to-end budget of one turn (sum of the chain's default budgets)


def remote_stage_names(stage: str) -> tuple[str, ...]:
    """The child rows a remote stage gets in a turn report: its server stages, then its network gap."""
    children = QA_SERVER_STAGES.names if stage == "qa" else ()
    return (*(f"{stage}{SEPARATOR}{child}" for child in children), f"{stage}{SEPARATOR}{NETWORK}")


# -- budgets -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budgets:
    """Per-stage budgets of the chain (and the turn's end-to-end budget), in nanoseconds."""

    stages: Mapping[str, int] = field(default_factory=CHAIN_STAGES.default_budgets)
    turn_ns: int = TURN_BUDGET_NS

    def __post_init__(self) -> None:
        for name, value in self.stages.items():
            CHAIN_STAGES[name]  # raises for an unknown stage
            if value <= 0:
                raise ValueError(f"budget of {name!r} must be positive, got {value} ns")
        if self.turn_ns <= 0:
            raise ValueError("the turn budget must be positive")

    def of(self, stage: str) -> int | None:
        """The budget of a chain stage (None for stages without one, e.g. child rows)."""
        return self.stages.get(stage)

    def with_overrides(self, overrides: Mapping[str, int]) -> Budgets:
        """A copy with some budgets replaced; the key "turn" sets the end-to-end budget."""
        stages = dict(self.stages)
        turn_ns = self.turn_ns
        for name, value in overrides.items():
            if name == "turn":
                turn_ns = value
            else:
                stages[name] = value
        return Budgets(stages, turn_ns)

    def as_ms(self) -> dict[str, float]:
        return {**{name: value / MS for name, value in self.stages.items()}, "turn": self.turn_ns / MS}


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s)?\s*$")
_UNIT_NS = {"ns": 1, "us": 1_000, "ms": MS, "s": 1_000_000_000, None: MS}


def parse_duration_ns(text: str) -> int:
    """'10ms', '2.5 ms', '500us', '0.1s' or a bare number of milliseconds -> nanoseconds (> 0)."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (e.g. 10ms, 500us, 0.2s)")
    value = float(match.group(1)) * _UNIT_NS[match.group(2)]
    if not 0 < value <= 3_600 * 1e9:
        raise ValueError(f"duration out of range (0, 1 h]: {text!r}")
    return int(value)


def parse_budgets(text: str, base: Budgets | None = None) -> Budgets:
    """'qa=10ms,asr=40ms,turn=120ms' -> Budgets (unnamed stages keep their defaults)."""
    overrides: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected STAGE=DURATION, got {item!r}")
        name = name.strip()
        if name != "turn" and name not in CHAIN_STAGES:
            raise ValueError(f"unknown stage {name!r}; known: {', '.join((*CHAIN_STAGES.names, 'turn'))}")
        overrides[name] = parse_duration_ns(value)
    return (base or Budgets()).with_overrides(overrides)


# -- one qa.v1 call ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageTimings:
    """Where one QA request's time went, in nanoseconds; `total_ns` covers everything, stages included.

    The fields are `QA_SERVER_STAGES` plus `total`, in that order (checked at import time), and mirror
    `qa.v1.StageTimings`.
    """

    queue_ns: int = 0
    tokenize_ns: int = 0
    infer_ns: int = 0
    decode_ns: int = 0
    total_ns: int = 0  # arrival to answer

    def over_budget(self, budget_ns: int = LANGUAGE_MODEL_BUDGET_NS) -> bool:
        return self.total_ns > budget_ns

    def as_dict(self) -> dict[str, int]:
        return {self.field_of(name): self.stage_ns(name) for name in (*STAGES, "total")}

    @staticmethod
    def field_of(stage: str) -> str:
        """The attribute that holds one of `STAGES` or "total" (e.g. "infer" -> "infer_ns")."""
        if stage != "total" and stage not in QA_SERVER_STAGES:
            raise ValueError(f"unknown QA stage {stage!r}")
        return f"{stage}_ns"

    def stage_ns(self, stage: str) -> int:
        """The duration of one of `STAGES` or "total"."""
        value: int = getattr(self, self.field_of(stage))
        return value

    @classmethod
    def from_durations(cls, durations: Mapping[str, int], total_ns: int) -> StageTimings:
        return cls(**{f"{name}_ns": int(durations.get(name, 0)) for name in STAGES}, total_ns=int(total_ns))

    @property
    def server_ns(self) -> int:
        return self.total_ns


assert tuple(StageTimings.__dataclass_fields__) == (*(f"{name}_ns" for name in STAGES), "total_ns")


class LatencyTracker:
    """Accumulates stage durations for one QA request (stages of `QA_SERVER_STAGES`).

    Stages may repeat (a long passage runs several engine calls); durations of the same stage add up.
    """

    def __init__(
        self,
        budget_ns: int = LANGUAGE_MODEL_BUDGET_NS,
        start_ns: int | None = None,
        stages: StageSet = QA_SERVER_STAGES,
    ) -> None:
        self.budget_ns = budget_ns
        self.start_ns = time.perf_counter_ns() if start_ns is None else start_ns
        self.stage_set = stages
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
        self.stage_set[name]  # unknown names are an error, never dropped
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
        return StageTimings.from_durations(self.stages, self._end_ns - self.start_ns)


# -- one conversational turn -------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSpan:
    """One row of a turn report: a stage's start offset from the turn's start, duration and budget."""

    name: str  # "asr", "qa", "qa.infer", "qa.network", ...
    start_ns: int
    duration_ns: int
    budget_ns: int | None = None

    @property
    def over_budget(self) -> bool:
        return self.budget_ns is not None and self.duration_ns > self.budget_ns

    @property
    def parent(self) -> str | None:
        head, sep, _ = self.name.rpartition(SEPARATOR)
        return head if sep else None

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "start_ms": self.start_ns / MS,
            "duration_ms": self.duration_ns / MS,
            "budget_ms": None if self.budget_ns is None else self.budget_ns / MS,
            "over_budget": self.over_budget,
        }


@dataclass(frozen=True)
class TurnReport:
    """Where one turn's time went: ordered stage rows (top-level and nested) and the end-to-end time.

    Top-level rows (`asr`, `qa`, `response`) are back to back; `unattributed_ns` is what lies between
    or around them (the chain's own hand-offs), so top-level durations + unattributed = total.
    """

    turn: int
    trace_id: str
    total_ns: int
    spans: tuple[StageSpan, ...]
    turn_budget_ns: int = TURN_BUDGET_NS
    error: str | None = None  # set when a stage failed or timed out (the spans say how far it got)

    @property
    def top_level(self) -> tuple[StageSpan, ...]:
        return tuple(span for span in self.spans if span.parent is None)

    @property
    def attributed_ns(self) -> int:
        return sum(span.duration_ns for span in self.top_level)

    @property
    def unattributed_ns(self) -> int:
        return max(0, self.total_ns - self.attributed_ns)

    @property
    def over_budget(self) -> bool:
        return self.total_ns > self.turn_budget_ns or any(span.over_budget for span in self.spans)

    def span(self, name: str) -> StageSpan | None:
        return next((span for span in self.spans if span.name == name), None)

    def as_dict(self) -> dict[str, object]:
        return {
            "turn": self.turn,
            "trace_id": self.trace_id,
            "total_ms": self.total_ns / MS,
            "turn_budget_ms": self.turn_budget_ns / MS,
            "over_budget": self.over_budget,
            "unattributed_ms": self.unattributed_ns / MS,
            "stages": [span.as_dict() for span in self.spans],
            "error": self.error,
        }


class TurnRecorder:
    """Builds a `TurnReport` while a turn runs: local stages timed here, remote stages folded in.

    A remote stage (reached over gRPC) is recorded with its client round trip; its server-side
    timings become child rows laid out from the stage's start, followed by `<stage>.network`: the
    round trip minus the server's total (time on the wire, in the transports, and in the event loops).
    """

    def __init__(self, turn: int, trace_id: str, budgets: Budgets | None = None, start_ns: int | None = None) -> None:
        self.turn = turn
        self.trace_id = trace_id
        self.budgets = budgets or Budgets()
        self.start_ns = time.perf_counter_ns() if start_ns is None else start_ns
        self._spans: list[StageSpan] = []
        self._end_ns: int | None = None

    def _offset(self, at_ns: int) -> int:
        return max(0, at_ns - self.start_ns)

    def record(self, name: str, begin_ns: int, end_ns: int) -> StageSpan:
        """A chain stage that ran from `begin_ns` to `end_ns` (perf_counter_ns)."""
        CHAIN_STAGES[name]
        span = StageSpan(name, self._offset(begin_ns), max(0, end_ns - begin_ns), self.budgets.of(name))
        self._spans.append(span)
        return span

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block as chain stage `name` (recorded even when it raises)."""
        begin = time.perf_counter_ns()
        try:
            yield
        finally:
            self.record(name, begin, time.perf_counter_ns())

    def record_remote(
        self, name: str, begin_ns: int, end_ns: int, server_stages: Mapping[str, int], server_total_ns: int
    ) -> StageSpan:
        """A remote chain stage: its round trip, its server stages (leaf name -> ns) and its network gap."""
        span = self.record(name, begin_ns, end_ns)
        cursor = span.start_ns
        for leaf, duration in server_stages.items():
            child = f"{name}{SEPARATOR}{leaf}"
            if child not in remote_stage_names(name):
                raise ValueError(f"unknown server stage {leaf!r} of {name!r}")
            self._spans.append(StageSpan(child, cursor, int(duration)))
            cursor += int(duration)
        network = max(0, span.duration_ns - int(server_total_ns))
        self._spans.append(StageSpan(f"{name}{SEPARATOR}{NETWORK}", cursor, network))
        return span

    def finish(self, end_ns: int | None = None, error: str | None = None) -> TurnReport:
        """Stop the clock (once) and return the report, rows ordered by the stage definitions."""
        if self._end_ns is None:
            self._end_ns = time.perf_counter_ns() if end_ns is None else end_ns
        order = {name: index for index, name in enumerate(CHAIN_STAGES.names)}

        def key(span: StageSpan) -> tuple[int, int, int]:
            top = span.name.partition(SEPARATOR)[0]
            return (order[top], 0 if span.parent is None else 1, span.start_ns)

        return TurnReport(
            turn=self.turn,
            trace_id=self.trace_id,
            total_ns=self._end_ns - self.start_ns,
            spans=tuple(sorted(self._spans, key=key)),
            turn_budget_ns=self.budgets.turn_ns,
            error=error,
        )
