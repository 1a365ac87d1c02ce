"""The dynamic batcher with a real ONNX Runtime engine: batching, bucketing, bounds, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from qacore.answerer import QuestionAnswerer
from qacore.engine import Engine, EngineOutputs
from qacore.errors import EngineError
from qacore.features import EngineInputs, Window
from services.batcher import Batcher, BatcherConfig
from services.errors import BatchFailedError, DeadlineExpiredError, NotServingError, QueueFullError

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
    long_passage = " ".join([PASSAGE] * 15)
    windows = windows_for(answerer, QUESTIONS[0], long_passage)
    assert len(windows) > 4
    observer = RecordingObserver()
    batcher = Batcher([answerer.engine], answerer.featurizer, BatcherConfig(max_batch_size=4), observer)
    batcher.start()
    result = await batcher.run(windows)
    await batcher.close()
    assert sum(size for size, _ in observer.batches) == len(windows)
    assert all(size <= 4 for size, _ in observer.batches)
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
    windows = windows_for(answerer, QUESTIONS[0], " ".join([PASSAGE] * 40))
    batcher = Batcher([answerer.engine], answerer.featurizer, BatcherConfig(max_queue_windows=2))
    batcher.start()
    assert (await batcher.run(windows)).start_logits.shape[0] == len(windows) > 2
    await batcher.close()


async def test_expired_work_is_dropped_before_it_runs(answerer: QuestionAnswerer) -> None:
    observer = RecordingObserver()
    batcher = Batcher([answerer.engine], answerer.featurizer, BatcherConfig(max_queue_delay_us=0), observer)
    doomed = batcher.submit(windows_for(answerer, QUESTIONS[0]), deadline_ns=time.perf_counter_ns() + 1_000_000)
    alive = batcher.submit(windows_for(answerer, QUESTIONS[1]))
    await asyncio.sleep(0.01)  # the deadline passes while the work is still queued
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
    await asyncio.sleep(0)
    queued = batcher.depth
    assert queued > 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.sleep(0)
    assert batcher.depth == 0
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


async def test_two_engine_contexts_run_batches_in_parallel(answerer: QuestionAnswerer, engine_dir: Path) -> None:
    from qacore.factory import EngineOptions, load_engine

    second = load_engine(engine_dir, EngineOptions(intra_op_threads=1))
    try:
        observer = RecordingObserver()
        config = BatcherConfig(max_batch_size=2, max_queue_delay_us=0)
        batcher = Batcher([answerer.engine, second], answerer.featurizer, config, observer)
        batcher.start()
        results = await asyncio.gather(*(batcher.run(windows_for(answerer, q)) for q in QUESTIONS))
        await batcher.close()
    finally:
        second.close()
    assert len(results) == len(QUESTIONS)
    assert sum(size for size, _ in observer.batches) == len(QUESTIONS)


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
