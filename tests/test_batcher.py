"""The dynamic batcher with a real ONNX Runtime engine: batching, bucketing, bounds, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from realtime_qa.qacore.answerer import QuestionAnswerer
from realtime_qa.qacore.engine import Engine, EngineOutputs
from realtime_qa.qacore.errors import EngineError
from realtime_qa.qacore.features import EngineInputs, Window
from realtime_qa.services.batcher import Batcher, BatcherConfig
from realtime_qa.services.errors import (
    BatchFailedError,
    DeadlineExpiredError,
    InvalidRequestError,
    NotServingError,
    QueueFullError,
)
from waiting import wait_until

PASSAGE = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
    "their leader Rollo, agreed to swear fealty to King Charles III of West Francia."
)
QUESTIONS = [
    "In what country is Normandy located?",
    "When were the Normans in Normandy?",
    "From which countries did the Norse originate?",
    "Who was the Norse leader?",
    "To whom did the Norse swear fealty?",
    "What region took the name of the Normans?",
    "Who were the Normans descended from?",
    "What did the Norse raiders agree to?",
]


@pytest.fixture(scope="module")
def answerer(engine_dir: Path) -> Iterator[QuestionAnswerer]:
    with QuestionAnswerer.from_engine_dir(engine_dir) as answerer:
        yield answerer


class RecordingObserver:
    """Keeps every batch the batcher reports, to assert on batch sizes and widths."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []  # (size, padded sequence length)

    def observe_batch(self, size: int, seq_len: int, real_tokens: int, infer_ns: int, ok: bool) -> None:
        self.batches.append((size, seq_len))


class FailingEngine(Engine):
    """An engine whose every call fails, as a broken GPU or corrupt model would."""

    def infer(self, inputs: EngineInputs) -> EngineOutputs:
        raise EngineError("device lost")


def windows_for(answerer: QuestionAnswerer, question: str, passage: str = PASSAGE) -> list[Window]:
    features = answerer.featurizer.featurize(question, passage)
    return features.windows


def direct_logits(answerer: QuestionAnswerer, windows: list[Window]) -> np.ndarray:
    outputs = answerer.engine.infer(answerer.featurizer.batch(windows))
    return outputs.start_logits


async def test_concurrent_requests_share_one_engine_call(answerer: QuestionAnswerer) -> None:
    observer = RecordingObserver()
    config = BatcherConfig(max_batch_size=8, max_queue_delay_us=200_000)
    batcher = Batcher([answerer.engine], answerer.featurizer, config, observer)
    batcher.start()
    requests = [windows_for(answerer, question) for question in QUESTIONS]
    results = await asyncio.gather(*(batcher.run(windows) for windows in requests))
    await batcher.close()
    assert observer.batches == [(8, max(w[0].seq_len for w in requests))]
    for windows, result in zip(requests, results, strict=True):
        assert result.batch_sizes == (8,)
        width = windows[0].seq_len
        np.testing.assert_allclose(result.start_logits[:, :width], direct_logits(answerer, windows), atol=1e-4)
        assert result.infer_ns > 0


async def test_max_batch_size_one_runs_each_window_alone(answerer: QuestionAnswerer) -> None:
    observer = RecordingObserver()
    batcher = Batcher([answerer.engine], answerer.featurizer, BatcherConfig(max_batch_size=1), observer)
    batcher.start()
    await asyncio.gather(*(batcher.run(windows_for(answerer, q)) for q in QUESTIONS[:4]))
    await batcher.close()
    assert [size for size, _ in observer.batches] == [1, 1, 1, 1]


async def test_long_passage_windows_are_split_across_batches(answerer: QuestionAnswerer) -> None:
    long_passage = " ".join([PASSAGE] * 10)  # 3 full-length windows: few, to keep the test fast
    windows = windows_for(answerer, QUESTIONS[0], long_passage)
    assert len(windows) > 2
    observer = RecordingObserver()
    batcher = Batcher([answerer.engine], answerer.featurizer, BatcherConfig(max_batch_size=2), observer)
    batcher.start()
    result = await batcher.run(windows)
    await batcher.close()
    assert len(observer.batches) > 1
    assert sum(size for size, _ in observer.batches) == len(windows)
    assert all(size <= 2 for size, _ in observer.batches)
    assert result.start_logits.shape[0] == len(windows)
    # Row order is the submission order, whatever batch each window ran in.
    for row, window in enumerate(windows):
        alone = direct_logits(answerer, [window])[0]
        np.testing.assert_allclose(result.start_logits[row, : window.seq_len], alone, atol=1e-4)


async def test_windows_of_similar_length_are_batched_together(answerer: QuestionAnswerer) -> None:
    short = windows_for(answerer, "Who?", "Rollo led the Norse.")
    long = windows_for(answerer, QUESTIONS[0], " ".join([PASSAGE] * 6))
    assert short[0].seq_len < 64 and long[0].seq_len > 256
    observer = RecordingObserver()
    config = BatcherConfig(max_batch_size=4, max_queue_delay_us=0, bucket_tokens=64)
    batcher = Batcher([answerer.engine], answerer.featurizer, config, observer)
    # Queue first (workers not started), interleaving short and long requests.
    futures = [batcher.submit(short if i % 2 == 0 else long[:1]) for i in range(8)]
    batcher.start()
    await asyncio.gather(*futures)
    await batcher.close()
    # The oldest window is short: short windows go first, padded only to their own length; long
    # ones never pad a batch of short ones.
    widths = [seq_len for _, seq_len in observer.batches]
    assert widths[0] == short[0].seq_len
    assert sorted(widths) == [short[0].seq_len, long[0].seq_len]


async def test_full_queue_refuses_new_work(answerer: QuestionAnswerer) -> None:
    batcher = Batcher([answerer.engine], answerer.featurizer, BatcherConfig(max_queue_windows=3))
    accepted = [batcher.submit(windows_for(answerer, q)) for q in QUESTIONS[:3]]
    with pytest.raises(QueueFullError, match="overloaded"):
        batcher.submit(windows_for(answerer, QUESTIONS[3]))
    batcher.start()
    results = await asyncio.gather(*accepted)
    assert len(results) == 3
    # Room again once the queue drained.
    assert (await batcher.run(windows_for(answerer, QUESTIONS[3]))).start_logits.shape[0] == 1
    await batcher.close()


async def test_request_larger_than_the_queue_is_admitted_when_idle(answerer: QuestionAnswerer) -> None:
    windows = windows_for(answerer, QUESTIONS[0], " ".join([PASSAGE] * 10))  # 3 windows
    batcher = Batcher([answerer.engine], answerer.featurizer, BatcherConfig(max_queue_windows=2))
    batcher.start()
    assert (await batcher.run(windows)).start_logits.shape[0] == len(windows) > 2
    await batcher.close()


async def test_expired_work_is_dropped_before_it_runs(answerer: QuestionAnswerer) -> None:
    observer = RecordingObserver()
    batcher = Batcher([answerer.engine], answerer.featurizer, BatcherConfig(max_queue_delay_us=0), observer)
    deadline_ns = time.perf_counter_ns() + 1_000_000
    doomed = batcher.submit(windows_for(answerer, QUESTIONS[0]), deadline_ns=deadline_ns)
    alive = batcher.submit(windows_for(answerer, QUESTIONS[1]))
    async with asyncio.timeout(10):  # the deadline passes while the work is still queued
        while time.perf_counter_ns() < deadline_ns:
            await asyncio.sleep(0.001)
    batcher.start()
    with pytest.raises(DeadlineExpiredError):
        await doomed
    await alive
    await batcher.close()
    assert observer.batches and sum(size for size, _ in observer.batches) == 1
    assert batcher.stats.dropped_windows == 1 and batcher.stats.run_windows == 1


async def test_run_raises_deadline_exceeded_when_the_answer_is_late(answerer: QuestionAnswerer) -> None:
    batcher = Batcher([answerer.engine], answerer.featurizer)
    with pytest.raises(DeadlineExpiredError):  # never started: nothing can finish in time
        await batcher.run(windows_for(answerer, QUESTIONS[0]), deadline_ns=time.perf_counter_ns() + 20_000_000)
    assert batcher.depth == 0
    await batcher.close()


async def test_cancelled_requests_are_dropped(answerer: QuestionAnswerer) -> None:
    observer = RecordingObserver()
    batcher = Batcher([answerer.engine], answerer.featurizer, BatcherConfig(max_queue_delay_us=0), observer)
    waiter = asyncio.create_task(batcher.run(windows_for(answerer, QUESTIONS[0], " ".join([PASSAGE] * 20))))
    await wait_until(lambda: batcher.depth > 0, 10, "the request's windows queued")
    queued = batcher.depth
    assert queued > 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await wait_until(lambda: batcher.depth == 0, 10, "the cancelled request's windows dropped")
    batcher.start()
    await batcher.run(windows_for(answerer, QUESTIONS[1]))
    await batcher.close()
    assert sum(size for size, _ in observer.batches) == 1
    assert batcher.stats.dropped_windows == queued


async def test_failed_batch_fails_every_request_in_it(answerer: QuestionAnswerer) -> None:
    observer = RecordingObserver()
    config = BatcherConfig(max_batch_size=8, max_queue_delay_us=0)
    batcher = Batcher([FailingEngine(answerer.engine.meta)], answerer.featurizer, config, observer)
    futures = [batcher.submit(windows_for(answerer, q)) for q in QUESTIONS[:3]]
    batcher.start()
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(result, BatchFailedError) for result in results)
    assert "device lost" in str(results[0]) and "batch of 3 windows" in str(results[0])
    assert batcher.stats.failed_batches == 1
    # The batcher survives a failed batch and keeps serving (and failing) later requests.
    with pytest.raises(BatchFailedError):
        await batcher.run(windows_for(answerer, QUESTIONS[3]))
    await batcher.close()


class SlowEngine(Engine):
    """Wraps an engine; each call holds its thread for `delay_s` and records how many calls overlap."""

    def __init__(self, inner: Engine, delay_s: float, tracker: dict[str, int]) -> None:
        super().__init__(inner.meta)
        self.inner, self.delay_s, self.tracker = inner, delay_s, tracker

    def infer(self, inputs: EngineInputs) -> EngineOutputs:
        self.tracker["running"] += 1
        self.tracker["most"] = max(self.tracker["most"], self.tracker["running"])
        try:
            time.sleep(self.delay_s)
            return self.inner.infer(inputs)
        finally:
            self.tracker["running"] -= 1


@pytest.fixture
def second_engine(engine_dir: Path) -> Iterator[Engine]:
    """A second instance of the test engine: the batcher's second context."""
    from realtime_qa.qacore.factory import EngineOptions, load_engine

    second = load_engine(engine_dir, EngineOptions(intra_op_threads=1))
    yield second
    second.close()


def two_context_batcher(
    answerer: QuestionAnswerer,
    engines: tuple[Engine, Engine],
    delays_s: tuple[float, float],
    tracker: dict[str, int],
    config: BatcherConfig,
    observer: RecordingObserver,
) -> Batcher:
    """A started batcher over two slowed engine contexts that record how many calls run at once in `tracker`."""
    slowed = [SlowEngine(engine, delay_s, tracker) for engine, delay_s in zip(engines, delays_s, strict=True)]
    batcher = Batcher(slowed, answerer.featurizer, config, observer)
    batcher.start()
    return batcher


async def test_two_engine_contexts_run_batches_in_parallel(answerer: QuestionAnswerer, second_engine: Engine) -> None:
    second, tracker = second_engine, {"running": 0, "most": 0}
    observer = RecordingObserver()
    config = BatcherConfig(max_batch_size=2, max_queue_delay_us=0)
    batcher = two_context_batcher(answerer, (answerer.engine, second), (0.05, 0.05), tracker, config, observer)
    results = await asyncio.gather(*(batcher.run(windows_for(answerer, q)) for q in QUESTIONS))
    await batcher.close()
    assert len(results) == len(QUESTIONS)
    assert sum(size for size, _ in observer.batches) == len(QUESTIONS)
    assert tracker["most"] == 2  # both contexts ran a batch at the same time


async def test_while_a_batch_runs_the_next_waits_for_more_windows_up_to_the_delay(
    answerer: QuestionAnswerer, second_engine: Engine
) -> None:
    """An idle engine starts a lone window at once; while that batch runs, windows that arrive wait (for the other
    context) until the batch is full or the oldest has waited max_queue_delay_us."""
    second, tracker = second_engine, {"running": 0, "most": 0}
    observer = RecordingObserver()
    config = BatcherConfig(max_batch_size=4, max_queue_delay_us=300_000)
    batcher = two_context_batcher(answerer, (answerer.engine, second), (1.5, 0.0), tracker, config, observer)
    first = asyncio.ensure_future(batcher.run(windows_for(answerer, QUESTIONS[0])))
    await wait_until(lambda: tracker["running"] == 1)  # the first window runs at once, alone
    began = time.perf_counter()
    later = [asyncio.ensure_future(batcher.run(windows_for(answerer, q))) for q in QUESTIONS[1:3]]
    await wait_until(lambda: batcher.depth == 2)  # both queued behind the running batch; then one more
    later.append(asyncio.ensure_future(batcher.run(windows_for(answerer, QUESTIONS[3]))))
    waited = await asyncio.gather(*later)
    waited_s = time.perf_counter() - began
    await first
    await batcher.close()
    assert [result.batch_sizes for result in waited] == [(3,)] * 3  # one batch, formed when the delay ran out
    assert 0.25 < waited_s < 1.2  # ... after ~0.3 s: not at once, not after the first batch (1.5 s)
    assert sorted(size for size, _ in observer.batches) == [1, 3]


async def test_a_backlog_gets_one_share_of_each_round_not_the_whole_engine(answerer: QuestionAnswerer) -> None:
    """Round robin over callers: a small request queued behind a multi-window request runs in the next batch."""
    backlog = windows_for(answerer, QUESTIONS[0], " ".join([PASSAGE] * 12))  # 4 windows, one batch each
    assert len(backlog) >= 4
    order: list[str] = []
    config = BatcherConfig(max_batch_size=1, max_queue_delay_us=0)
    batcher = Batcher([answerer.engine], answerer.featurizer, config)
    big = batcher.submit(backlog, caller="big")
    small = batcher.submit(windows_for(answerer, QUESTIONS[1]), caller="small")
    big.add_done_callback(lambda _: order.append("big"))
    small.add_done_callback(lambda _: order.append("small"))
    batcher.start()
    await asyncio.gather(big, small)
    await batcher.close()
    assert order == ["small", "big"]
    assert batcher.stats.batches == len(backlog) + 1


async def test_a_caller_over_its_share_is_refused_but_others_are_admitted(answerer: QuestionAnswerer) -> None:
    config = BatcherConfig(max_queue_windows=8, max_request_windows=8)
    batcher = Batcher([answerer.engine], answerer.featurizer, config)
    many = windows_for(answerer, QUESTIONS[0], " ".join([PASSAGE] * 25))[:8]
    batcher.submit(many, caller="hog")  # fills the queue (admitted: the queue was empty)
    with pytest.raises(QueueFullError, match="overloaded"):
        batcher.submit(windows_for(answerer, QUESTIONS[1]), caller="hog")  # the hog is over its share
    admitted = batcher.submit(windows_for(answerer, QUESTIONS[2]), caller="polite")  # another caller is not
    batcher.start()
    assert (await admitted).start_logits.shape[0] == 1
    await batcher.close()


async def test_a_request_over_the_window_limit_is_invalid(answerer: QuestionAnswerer) -> None:
    batcher = Batcher([answerer.engine], answerer.featurizer, BatcherConfig(max_request_windows=3))
    windows = windows_for(answerer, QUESTIONS[0], " ".join([PASSAGE] * 15))
    assert len(windows) > 3
    with pytest.raises(InvalidRequestError, match=f"needs {len(windows)} windows .* the limit is 3 per question"):
        batcher.submit(windows)
    assert batcher.depth == 0
    await batcher.close()


def test_batching_plan_groups_by_length_and_scatters_back_in_order() -> None:
    """The one batching path (qacore.batching), without an engine."""
    from realtime_qa.qacore.batching import LogitsTable, length_bucket, plan_batches, scatter_rows

    assert plan_batches([30, 10, 20, 10], 2) == [[1, 3], [2, 0]]
    assert (length_bucket(64, 64), length_bucket(65, 64)) == (1, 2)
    rows = [np.zeros(3, np.int32), np.zeros(5, np.int32)]
    windows = [Window(ids, ids, 1, 0, len(ids) - 2, np.ones(len(ids) - 2, bool)) for ids in rows]
    table = LogitsTable.for_windows(windows)
    batch = np.arange(10, dtype=np.float32).reshape(2, 5)
    scatter_rows(table, [1, 0], [5, 3], batch, -batch)
    assert table.complete
    np.testing.assert_array_equal(table.start[0], [5, 6, 7, -np.inf, -np.inf])
    np.testing.assert_array_equal(table.start[1], [0, 1, 2, 3, 4])


async def test_closed_batcher_refuses_work(answerer: QuestionAnswerer) -> None:
    batcher = Batcher([answerer.engine], answerer.featurizer)
    batcher.start()
    await batcher.close()
    with pytest.raises(NotServingError):
        batcher.submit(windows_for(answerer, QUESTIONS[0]))


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        BatcherConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue_windows"):
        BatcherConfig(max_queue_windows=0)


async def test_a_few_window_question_of_a_lone_caller_never_yields(
    answerer: QuestionAnswerer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one window per batch, a 3-window question is not a backlog: its later windows run at once instead
    of yielding to the caller's own previous request (the yield is made an hour long, so a wrong rule hangs)."""
    import realtime_qa.services.batcher as batcher_module

    monkeypatch.setattr(batcher_module, "LIGHT_YIELD_NS", 3_600 * 10**9)
    monkeypatch.setattr(batcher_module, "BACKLOG_STARVATION_NS", 3_600 * 10**9)
    windows = windows_for(answerer, QUESTIONS[0], " ".join([PASSAGE] * 12))[:3]
    assert len(windows) == 3
    batcher = Batcher([answerer.engine], answerer.featurizer, BatcherConfig(max_batch_size=1, max_queue_delay_us=0))
    batcher.start()
    async with asyncio.timeout(30):
        await batcher.run(windows[:1])  # the client's previous (light) request ends: the yield would start now
        result = await batcher.run(windows)
    await batcher.close()
    assert result.batch_sizes == (1, 1, 1)
    # A real backlog still yields: five windows from one caller are more than BACKLOG_MIN_WINDOWS.
    assert batcher_module.BACKLOG_MIN_WINDOWS < 5
