"""Prometheus metrics of the service: per-stage latency, batches, queue depth, status codes, the latency budget.

Each server owns its own registry, so several servers can run in one process (tests) without clashing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from realtime_qa.qacore.latency import QA_SERVER_STAGES, StageTimings

log = logging.getLogger(__name__)

# 50 us .. 2.5 s: the interesting range is around the 10 ms budget.
LATENCY_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
END_TO_END = "end_to_end"


@dataclass(frozen=True)
class _ModelSeries:
    """One model's latency series: per stage (name, `StageTimings` field, histogram, budget or None), and end to end."""

    stages: list[tuple[str, str, Any, int | None]]
    end_to_end: Any


class ServiceMetrics:
    """The metric families and the helpers the service calls; `registry` is what the endpoint serves."""

    def __init__(self, budget_ns: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.budget_ns = budget_ns
        self.stage_latency = Histogram(
            "qa_stage_latency_seconds",
            "Server-side time per request and stage (queue, tokenize, infer, decode, end_to_end); "
            "engine_call: duration of each engine batch.",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "qa_batch_size_windows",
            "Windows per engine call.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.padding = Histogram(
            "qa_batch_padding_ratio",
            "Share of an engine batch's tokens that are padding.",
            ["model"],
            buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
            registry=self.registry,
        )
        self.batches = Counter(
            "qa_engine_batches", "Engine calls by outcome (ok, failed).", ["model", "outcome"], registry=self.registry
        )
        self.queue_depth = Gauge(
            "qa_queue_depth_windows", "Windows waiting in the batcher's queue.", ["model"], registry=self.registry
        )
        self.requests = Counter(
            "qa_requests", "Answered questions and failed calls by method and gRPC status code.",
            ["method", "code"], registry=self.registry,
        )  # fmt: skip
        self.budget = Gauge(
            "qa_latency_budget_seconds", "Latency budgets the service is held to.", ["stage"], registry=self.registry
        )
        self.budget.labels("language_model").set(budget_ns / 1e9)
        self.over_budget = Counter(
            "qa_requests_over_budget",
            "Answered questions whose server-side end-to-end time exceeded the language-model budget.",
            ["model"],
            registry=self.registry,
        )
        self.stage_over_budget = Counter(
            "qa_stage_over_budget",
            "Answered questions by stage whose time in that stage exceeded its budget (stages of "
            "qacore.latency.QA_SERVER_STAGES that have a budget, and end_to_end against the language-model budget).",
            ["model", "stage"],
            registry=self.registry,
        )
        self._stage_budgets = {spec.name: spec.budget_ns for spec in QA_SERVER_STAGES if spec.budget_ns is not None}
        for stage, stage_budget_ns in self._stage_budgets.items():
            self.budget.labels(stage).set(stage_budget_ns / 1e9)
        self._http_server: Any = None
        self._model_series: dict[str, _ModelSeries] = {}
        self._request_counters: dict[tuple[str, str], Any] = {}

    def observe_answer(self, model_id: str, timings: StageTimings) -> None:
        series = self._series_of(model_id)
        for stage, field, histogram, stage_budget_ns in series.stages:
            duration_ns = getattr(timings, field)
            histogram.observe(duration_ns / 1e9)
            if stage_budget_ns is not None and duration_ns > stage_budget_ns:
                self.stage_over_budget.labels(model_id, stage).inc()
        series.end_to_end.observe(timings.total_ns / 1e9)
        if timings.over_budget(self.budget_ns):
            self.over_budget.labels(model_id).inc()
            self.stage_over_budget.labels(model_id, END_TO_END).inc()

    def _series_of(self, model_id: str) -> _ModelSeries:
        """The model's stage histograms with each stage's `StageTimings` field and budget, looked up once:
        `labels()` takes a lock and a dict lookup per call, paid per stage on every answer on the event loop."""
        series = self._model_series.get(model_id)
        if series is None:
            stages = [
                (
                    stage,
                    StageTimings.field_of(stage),
                    self.stage_latency.labels(model_id, stage),
                    self._stage_budgets.get(stage),
                )
                for stage in QA_SERVER_STAGES.names
            ]
            series = self._model_series[model_id] = _ModelSeries(
                stages, self.stage_latency.labels(model_id, END_TO_END)
            )
        return series

    def count_request(self, method: str, code_name: str) -> None:
        counter = self._request_counters.get((method, code_name))
        if counter is None:  # one child per (method, code), as `labels()` keeps them; looked up once (no lock)
            counter = self._request_counters[(method, code_name)] = self.requests.labels(method, code_name)
        counter.inc()

    def track_queue_depth(self, model_id: str, depth: Callable[[], float]) -> None:
        self.queue_depth.labels(model_id).set_function(depth)

    def batch_observer(self, model_id: str) -> ModelBatchObserver:
        return ModelBatchObserver(self, model_id)

    def serve_http(self, host: str, port: int) -> int:
        """Expose the registry at http://host:port/metrics (port 0 picks a free one); returns the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http_server = server
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None


class ModelBatchObserver:
    """The batcher's view of the metrics for one model (implements `services.batcher.BatchObserver`)."""

    def __init__(self, metrics: ServiceMetrics, model_id: str) -> None:
        self._size = metrics.batch_size.labels(model_id)
        self._padding = metrics.padding.labels(model_id)
        self._ok = metrics.batches.labels(model_id, "ok")
        self._failed = metrics.batches.labels(model_id, "failed")
        self._infer = metrics.stage_latency.labels(model_id, "engine_call")

    def observe_batch(self, size: int, seq_len: int, real_tokens: int, infer_ns: int, ok: bool) -> None:
        if not ok:
            self._failed.inc()
            return
        self._ok.inc()
        self._size.observe(size)
        total = size * seq_len
        self._padding.observe(1.0 - real_tokens / total if total else 0.0)
        self._infer.observe(infer_ns / 1e9)


class EngineProcessMetrics:
    """How much the engine process (`qa-serve --engine-process`) merges: per engine batch, the workers' calls it
    ran and their windows. Written to the `--workers` multiprocess directory, so the parent's /metrics has them."""

    def __init__(self, model_id: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()

        def per_batch(name: str, documentation: str) -> Any:
            family = Histogram(name, documentation, ["model"], buckets=BATCH_SIZE_BUCKETS, registry=self.registry)
            return family.labels(model_id)

        self._calls = per_batch(
            "qa_engine_process_calls_per_batch", "Workers' engine calls merged into each batch of the engine process."
        )
        self._windows = per_batch("qa_engine_process_batch_windows", "Windows per batch of the engine process.")

    def observe_batch(self, calls: int, windows: int) -> None:
        self._calls.observe(calls)
        self._windows.observe(windows)
