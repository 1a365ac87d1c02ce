"""Fairness under hostile load, on the CPU engine: one caller's backlog never starves another caller.

While one caller runs the largest request the limits allow and another floods an `AnswerStream`
without reading its answers, a third client's small requests keep their normal latency within 2x.
"Normal" is measured in the same test, on the same server, interleaved with the loaded measurements
(quiet, loaded, quiet, loaded, ...), so a machine that is slow for other reasons is slow for both.
The comparison is of medians, which one descheduled request cannot move.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from realtime_qa.qacore.answerer import QuestionAnswerer
from realtime_qa.services.batcher import Batcher
from realtime_qa.services.config import BatcherConfig, EngineSpec, ServerConfig
from realtime_qa.services.server import QAServer
from waiting import wait_until

from realtime_qa.qa.v1 import qa_pb2, qa_pb2_grpc

SMALL_PASSAGE = "The Normans gave their name to Normandy, a region in France. Their leader was Rollo."
SMALL_QUESTION = "Who was the leader of the Normans?"
BIG_QUESTION = "Who were the Normans?"
BIG_PASSAGE = " ".join(
    [
        "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region "
        "in France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway."
    ]
    * 120
)
# The flood's questions carry a 2,000-character passage (a window or two each): the server's HTTP/2 receive
# window, grown by gRPC's BDP probing to several MB, then fills after ~3,000 writes instead of the ~40,000
# that 85-character questions took (about 2 s of both processes' CPU per round, before any measurement).
FLOOD_PASSAGE = BIG_PASSAGE[:2000]
STREAM_LIMIT = 4  # questions the flooding stream may have in flight
ROUNDS = 5
SMALL_PER_PHASE = 8


@pytest.fixture(scope="module")
def big_windows(engine_dir: Path) -> int:
    """Windows of the big request: the test's server allows exactly this many per question."""
    with QuestionAnswerer.from_engine_dir(engine_dir) as answerer:
        return len(answerer.featurizer.featurize(BIG_QUESTION, BIG_PASSAGE).windows)


@pytest.fixture
async def server(engine_dir: Path, big_windows: int) -> AsyncIterator[QAServer]:
    # CPU serving as documented for latency isolation: two engine contexts of one thread each, no batching
    # (it does not raise CPU throughput), so callers with a backlog keep one context free for the others.
    config = ServerConfig(
        port=0,
        engines=(EngineSpec(engine_dir),),
        engine_contexts=2,
        intra_op_threads=1,
        batcher=BatcherConfig(max_batch_size=1, max_queue_delay_us=0, max_request_windows=big_windows),
        max_stream_questions=STREAM_LIMIT,
        grace_s=5.0,
    )
    async with QAServer(config) as server:
        yield server


def big_queued(batcher: Batcher) -> int:
    """Queued windows of the one unary caller with a backlog (the big request)."""
    unary = [queued for caller, queued in batcher.queued_by_caller().items() if caller.startswith("#")]
    return max(unary, default=0)


async def small_latencies(
    stub: qa_pb2_grpc.QuestionAnsweringStub, count: int, server_ms: list[tuple[float, float]] | None = None
) -> list[float]:
    """Client-side latencies of `count` small requests in turn; the server's queue and engine time of each
    go to `server_ms` (to say, when the test fails, where the time went)."""
    request = qa_pb2.AnswerRequest(question=SMALL_QUESTION, passage=SMALL_PASSAGE)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        response = await stub.Answer(request, timeout=60)
        latencies.append(time.perf_counter() - started)
        assert response.answer.text
        if server_ms is not None:
            server_ms.append((response.timings.queue_ns / 1e6, response.timings.infer_ns / 1e6))
    return latencies


class Flood:
    """Floods a stream with questions and never reads an answer; gRPC flow control holds the writer back
    once the transport's window is full (until then the bytes only cost the transport, on both sides)."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call
        self.written = 0
        self.task = asyncio.create_task(self._write())

    async def _write(self) -> None:
        request = qa_pb2.AnswerRequest(question=BIG_QUESTION, passage=FLOOD_PASSAGE)
        for index in range(1_000_000):
            request.request_id = str(index)
            await self.call.write(request)
            self.written += 1

    async def wait_held_back(self, quiet_s: float = 0.3, timeout_s: float = 60) -> None:
        """Until the writer made no progress for `quiet_s` (flow control holds it). The sleep is the
        observation window of that state, which no event announces; the loop is bounded by `timeout_s`."""
        async with asyncio.timeout(timeout_s):
            while True:
                before = self.written
                await asyncio.sleep(quiet_s)
                if self.written == before:
                    return

    async def stop(self) -> None:
        self.task.cancel()
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_small_requests_keep_their_latency_under_a_huge_request_and_a_flood(
    server: QAServer, big_windows: int
) -> None:
    batcher = next(iter(server.models)).batcher
    sessions = server.service.streams
    big = qa_pb2.AnswerRequest(question=BIG_QUESTION, passage=BIG_PASSAGE)
    async with (
        grpc.aio.insecure_channel(server.target) as small_channel,
        grpc.aio.insecure_channel(server.target) as big_channel,
        grpc.aio.insecure_channel(server.target) as flood_channel,
    ):
        small = qa_pb2_grpc.QuestionAnsweringStub(small_channel)
        big_stub = qa_pb2_grpc.QuestionAnsweringStub(big_channel)
        flood_stub = qa_pb2_grpc.QuestionAnsweringStub(flood_channel)

        # One window more than the limit is refused up front, with the documented code.
        over = qa_pb2.AnswerRequest(question=BIG_QUESTION, passage=BIG_PASSAGE + " " + BIG_PASSAGE[:2000])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await big_stub.Answer(over, timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"the limit is {big_windows:,} per question" in (refused.value.details() or "")

        for _ in range(3):  # warm the path on both engine contexts
            await asyncio.gather(small_latencies(small, 1), small_latencies(small, 1))
        quiet_server: list[tuple[float, float]] = []
        loaded_server: list[tuple[float, float]] = []
        # Quiet and loaded phases alternate, every loaded phase between two quiet ones: q L q L ... L q.
        quiet_phases = [await small_latencies(small, SMALL_PER_PHASE, quiet_server)]
        loaded_phases: list[list[float]] = []
        for _ in range(ROUNDS):
            huge = big_stub.Answer(big, timeout=120)  # the largest request the limits allow
            flood = Flood(flood_stub.AnswerStream())
            await wait_until(lambda: big_queued(batcher) > 0)
            await wait_until(lambda: any(session.read >= STREAM_LIMIT for session in sessions))
            await flood.wait_held_back()

            loaded_phases.append(await small_latencies(small, SMALL_PER_PHASE, loaded_server))

            # The flood is held back: the server never read more than its in-flight limit allows ahead.
            assert all(session.read - session.written <= STREAM_LIMIT for session in sessions)
            assert not flood.task.done()
            assert big_queued(batcher) > 0, "the big request must still be running"
            await flood.stop()
            huge.cancel()
            await wait_until(lambda: batcher.depth == 0 and batcher.busy_contexts == 0 and not sessions)
            quiet_phases.append(await small_latencies(small, SMALL_PER_PHASE, quiet_server))

    # Each loaded phase against the quiet phases around it (so a host that slows down or speeds up for
    # other reasons during the test moves both sides), then the median over the rounds.
    ratios = [
        statistics.median(loaded) / statistics.mean((statistics.median(before), statistics.median(after)))
        for loaded, before, after in zip(loaded_phases, quiet_phases, quiet_phases[1:], strict=False)
    ]
    quiet_median = statistics.median(latency for phase in quiet_phases for latency in phase)
    loaded_median = statistics.median(latency for phase in loaded_phases for latency in phase)
    where = {
        phase: "queue {:.1f} ms, engine {:.1f} ms".format(*map(statistics.median, zip(*rows, strict=True)))
        for phase, rows in (("quiet", quiet_server), ("loaded", loaded_server))
    }
    report = (
        f"small request median: quiet {quiet_median * 1e3:.1f} ms ({where['quiet']}), "
        f"loaded {loaded_median * 1e3:.1f} ms ({where['loaded']}); "
        f"loaded/quiet per round {', '.join(f'{ratio:.2f}' for ratio in ratios)}"
    )
    print(report)
    assert statistics.median(ratios) <= 2.0, report
