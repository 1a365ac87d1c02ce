"""The latency board and its dashboard server: percentiles, over-budget rates, bounded memory, and the
same numbers in /api/latency, /api/events and /metrics (a real aiohttp server on port 0)."""

from __future__ import annotations

import asyncio
import json
import math
import random
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from realtime_qa.pipeline.board import TURN, BoardConfig, LatencyBoard, board_stage_names, percentile
from realtime_qa.pipeline.dashboard import DashboardConfig, start_dashboard
from realtime_qa.qacore.latency import MS, Budgets, StageSpan, TurnRecorder, TurnReport
from waiting import wait_until

WAIT_S = 10.0  # every wait on observable state gives up after this long


def synthetic_turn(
    turn: int, asr_ms: float, qa_ms: float, response_ms: float, gap_ms: float = 0.2, error: str | None = None
) -> TurnReport:
    """A turn as the chain reports it: asr, a remote qa with server stages and network, response."""
    recorder = TurnRecorder(turn, f"trace-{turn}", Budgets(), start_ns=0)
    t = 0
    asr_end = t + int(asr_ms * MS)
    recorder.record("asr", t, asr_end)
    qa_begin = asr_end + int(gap_ms * MS)
    qa_end = qa_begin + int(qa_ms * MS)
    server = int(qa_ms * 0.8 * MS)
    stages = {"queue": server // 10, "tokenize": server // 10, "infer": server * 7 // 10, "decode": server // 10}
    recorder.record_remote("qa", qa_begin, qa_end, stages, server)
    response_end = qa_end + int(response_ms * MS)
    recorder.record("response", qa_end, response_end)
    return recorder.finish(end_ns=response_end + int(gap_ms * MS), error=error)


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_percentile_matches_numpy() -> None:
    rng = random.Random(7)
    values = sorted(rng.randrange(1, 10_000_000) for _ in range(537))
    for q in (0, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert math.isnan(percentile([], 50))
    assert percentile([5], 99) == 5


def test_board_percentiles_and_over_budget_rates() -> None:
    board = LatencyBoard()
    qa_values = [float(v) for v in range(1, 101)]  # 1..100 ms: 90 of them over the 10 ms QA budget
    for index, qa_ms in enumerate(qa_values):
        board.record(synthetic_turn(index, asr_ms=5.0, qa_ms=qa_ms, response_ms=1.0))
    snap = board.snapshot()
    qa = next(row for row in snap["stages"] if row["name"] == "qa")
    expected = np.percentile(np.array([int(v * MS) for v in qa_values]), [50, 95, 99]) / MS
    assert [qa["p50_ms"], qa["p95_ms"], qa["p99_ms"]] == pytest.approx(list(expected), abs=1e-3)
    assert qa["budget_ms"] == 10.0
    assert qa["over_budget_rate"] == pytest.approx(0.90)
    assert qa["over_budget_total"] == 90
    assert qa["status"] == "over"
    asr = next(row for row in snap["stages"] if row["name"] == "asr")
    assert asr["status"] == "ok" and asr["over_budget_rate"] == 0.0
    infer = next(row for row in snap["stages"] if row["name"] == "qa.infer")
    assert infer["window"] == 100 and infer["budget_ms"] is None and infer["status"] == "none"
    # A turn is over budget when any stage is: the 90 slow QA turns.
    assert snap["turns"] == {"total": 100, "within_budget": 10, "over_budget": 90, "error": 0}
    assert snap["over_budget_rate"] == pytest.approx(0.90)
    assert snap["status"] == "over"
    assert [row["name"] for row in snap["stages"]] == list(board_stage_names())
    assert snap["stages"][-1]["name"] == TURN and snap["turn"]["budget_ms"] == 150.0
    json.dumps(snap, allow_nan=False)  # the page gets strict JSON


def test_board_counts_errors_and_is_green_when_fast() -> None:
    board = LatencyBoard()
    assert board.snapshot()["status"] == "idle"
    for index in range(20):
        board.record(synthetic_turn(index, 3.0, 4.0, 1.0))
    assert board.snapshot()["status"] == "ok"
    board.record(synthetic_turn(20, 3.0, 4.0, 1.0, error="response: DEADLINE_EXCEEDED"))
    snap = board.snapshot()
    assert snap["turns"]["error"] == 1
    assert snap["error_rate"] == pytest.approx(1 / 21)
    assert snap["recent"][-1]["error"] == "response: DEADLINE_EXCEEDED"
    assert snap["recent"][-1]["outcome"] == "error"


def test_board_memory_is_bounded() -> None:
    board = LatencyBoard(BoardConfig(window=50, recent_turns=10))
    for index in range(5_000):
        board.record(synthetic_turn(index, 2.0 + index % 7, 3.0 + index % 11, 1.0))
    snap = board.snapshot()
    assert len(snap["recent"]) == 10 and snap["recent"][-1]["turn"] == 4_999
    assert snap["window_turns"] == 50
    assert all(row["window"] <= 50 for row in snap["stages"])
    assert snap["turns"]["total"] == 5_000 and snap["turn"]["count"] == 5_000
    # the window is the last 50 turns: qa = 3 + index % 11 over indices 4950..4999
    window_qa = sorted(int((3.0 + i % 11) * MS) for i in range(4_950, 5_000))
    assert next(r for r in snap["stages"] if r["name"] == "qa")["p50_ms"] == pytest.approx(
        percentile(window_qa, 50) / MS
    )


def test_board_rejects_unknown_stages() -> None:
    board = LatencyBoard()
    report = TurnReport(turn=1, trace_id="t", total_ns=5 * MS, spans=(StageSpan("tts", 0, MS),))
    with pytest.raises(ValueError, match="unknown stage"):
        board.record(report)
    assert board.snapshot()["turns"]["total"] == 0  # nothing half-recorded


def test_board_uses_the_sessions_budgets() -> None:
    board = LatencyBoard()
    recorder = TurnRecorder(1, "t", Budgets().with_overrides({"qa": 2 * MS, "turn": 20 * MS}), start_ns=0)
    recorder.record("qa", 0, 3 * MS)
    board.record(recorder.finish(end_ns=4 * MS))
    snap = board.snapshot()
    assert snap["budgets_ms"]["qa"] == 2.0 and snap["budgets_ms"][TURN] == 20.0
    assert snap["turns"]["over_budget"] == 1


def test_turns_per_second_uses_the_clock() -> None:
    now = [0]
    board = LatencyBoard(BoardConfig(rate_window_s=10.0), clock_ns=lambda: now[0])
    for _ in range(30):
        now[0] += 100 * MS  # 10 turns/s for 3 s
        board.record(synthetic_turn(1, 1.0, 1.0, 1.0))
    assert board.turns_per_s() == pytest.approx(10.0)
    now[0] += 20 * 1_000_000_000  # idle for 20 s: nothing in the last 10 s
    assert board.turns_per_s() == 0.0


async def test_metrics_and_api_show_the_same_numbers() -> None:
    board = LatencyBoard()
    board.set_info({"backend": "onnxruntime", "precision": "fp32", "model": "<script>alert(1)</script>"})
    rng = random.Random(3)
    for index in range(200):
        board.record(synthetic_turn(index, rng.uniform(1, 60), rng.uniform(1, 14), rng.uniform(0.5, 3)))
    server = await start_dashboard(board, port=0)
    try:
        assert server.port and server.url == f"http://127.0.0.1:{server.port}/"
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url + "api/latency") as response:
                assert response.status == 200
                snap = await response.json()
            async with http.get(server.url + "metrics") as response:
                assert response.status == 200
                metrics = metric_values(await response.text())
            async with http.get(server.url + "healthz") as response:
                assert response.status == 200 and (await response.text()).strip() == "ok"
            async with http.get(server.url) as response:
                assert response.status == 200 and "Latency budget" in await response.text()
            async with http.get(server.url + "static/dashboard.js") as response:
                assert response.status == 200
            async with http.get(server.url + "static/../board.py") as response:
                assert response.status in (403, 404)
    finally:
        await server.stop()

    assert snap["info"]["model"] == "<script>alert(1)</script>"  # data, escaped by the page (textContent)
    for row in snap["stages"]:
        labels = (("stage", row["name"]),)
        assert metrics[("assistant_stage_latency_seconds_count", labels)] == row["count"]
        assert metrics[("assistant_stage_latency_seconds_sum", labels)] == pytest.approx(row["sum_ms"] / 1e3)
        if row["budget_ms"] is not None:
            assert metrics[("assistant_stage_over_budget_total", labels)] == row["over_budget_total"]
            assert metrics[("assistant_stage_budget_seconds", labels)] == pytest.approx(row["budget_ms"] / 1e3)
    for outcome in ("within_budget", "over_budget", "error"):
        assert metrics[("assistant_turns_total", (("outcome", outcome),))] == snap["turns"][outcome]
    # Percentiles: exact over the window in the JSON; in Prometheus the same observations fall into
    # buckets, so the bucket holding the JSON's p95 holds Prometheus' p95 estimate too.
    qa = next(row for row in snap["stages"] if row["name"] == "qa")
    below_budget = metrics[("assistant_stage_latency_seconds_bucket", (("le", "0.01"), ("stage", "qa")))]
    assert below_budget == qa["count"] - qa["over_budget_total"]


async def test_events_push_snapshots_and_drop_gone_clients() -> None:
    board = LatencyBoard()
    server = await start_dashboard(board, port=0, config=DashboardConfig(push_interval_s=0.05))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url + "api/events") as response:
                assert response.headers["Content-Type"].startswith("text/event-stream")
                first = await read_event(response)
                assert first["turns"]["total"] == 0
                await wait_until(lambda: server.clients == 1, WAIT_S, "stream registered")
                for index in range(5):
                    board.record(synthetic_turn(index, 2.0, 3.0, 1.0))
                seen = first
                async with asyncio.timeout(WAIT_S):
                    while seen["turns"]["total"] < 5:  # pushes are throttled: several turns per event
                        seen = await read_event(response)
                assert seen["recent"][-1]["turn"] == 4
            await wait_until(lambda: server.clients == 0, WAIT_S, "closed stream dropped")
            board.record(synthetic_turn(9, 2.0, 3.0, 1.0))  # a push with no clients is fine
    finally:
        await server.stop()


async def test_event_stream_limit_and_stalled_clients() -> None:
    board = LatencyBoard()
    config = DashboardConfig(push_interval_s=0.0, max_clients=1, client_queue=1, stall_limit=3)
    server = await start_dashboard(board, port=0, config=config)
    try:
        async with aiohttp.ClientSession() as http, http.get(server.url + "api/events") as response:
            await read_event(response)
            await wait_until(lambda: server.clients == 1, WAIT_S, "stream registered")
            async with http.get(server.url + "api/events") as second:
                assert second.status == 503
            # This client stops reading; large snapshots fill the socket, then its queue: dropped.
            for index in range(3_000):
                board.record(synthetic_turn(index, 2.0, 3.0, 1.0, error="x" * 2_000))
                if index % 20 == 0:
                    await asyncio.sleep(0.005)
                if server.clients == 0:
                    break
            await wait_until(lambda: server.clients == 0, WAIT_S, "stalled stream dropped")
    finally:
        await server.stop()


async def read_event(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The next `latency` event's JSON from an SSE response (comments and other fields skipped)."""
    data: list[str] = []
    while True:
        line = (await response.content.readline()).decode()
        if line == "":
            raise EOFError("event stream closed")
        line = line.rstrip("\n")
        if line.startswith("data: "):
            data.append(line[len("data: ") :])
        elif line == "" and data:
            event: dict[str, Any] = json.loads("\n".join(data))
            return event


async def test_port_in_use_is_a_clear_error() -> None:
    board = LatencyBoard()
    server = await start_dashboard(board, port=0)
    try:
        with pytest.raises(OSError, match="cannot serve the dashboard"):
            await start_dashboard(board, port=server.port)  # type: ignore[arg-type]
    finally:
        await server.stop()
