"""Dynamic batching: windows from many concurrent requests share engine calls.

The batcher sees windows, not requests. A request submits its windows (one per passage chunk) and
awaits their logits; worker tasks (one per engine context, each with its own single executor
thread, so the event loop never blocks on inference) take up to `max_batch_size` windows per call.
A batch starts when it is full or when its oldest window has waited `max_queue_delay_us`.

Padding is limited by bucketing windows by length: a batch takes windows from the bucket of the
oldest queued window (first come, first served across buckets), then fills up with windows from
shorter buckets, which pad up to at most that bucket's width. Longer windows never join.

The queue is bounded (`max_queue_windows`; a full queue raises `QueueFullError` at submit time).
Work of requests that were cancelled or whose deadline passed is dropped before it runs, and a failed
engine call fails every request that had a window in it with `BatchFailedError`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from qacore.engine import Engine
from qacore.features import Featurizer, Window
from services.errors import BatchFailedError, DeadlineExpiredError, NotServingError, QueueFullError
from services.logctx import current_request_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatcherConfig:
    """How windows are grouped into engine calls."""

    max_batch_size: int = 16  # windows per engine call (capped at the engine's own maximum); 1 = no batching
    max_queue_delay_us: int = 1_000  # longest a window waits for others to fill its batch
    max_queue_windows: int = 2_048  # bounded queue: more queued windows than this are refused
    bucket_tokens: int = 64  # windows within the same multiple of this many tokens batch together first

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.max_queue_windows < 1:
            raise ValueError(f"max_queue_windows must be >= 1, got {self.max_queue_windows}")
        if self.bucket_tokens < 1:
            raise ValueError(f"bucket_tokens must be >= 1, got {self.bucket_tokens}")


@dataclass(frozen=True, eq=False)
class WindowLogits:
    """The logits of one request's windows, rows in submission order, plus where its batcher time went."""

    start_logits: np.ndarray  # float32 [windows, width]; columns past a window's length are -inf
    end_logits: np.ndarray
    queue_ns: int  # time in the batcher not spent in engine calls carrying this request
    infer_ns: int  # summed duration of the engine calls that carried this request's windows
    batch_sizes: tuple[int, ...]  # size of each engine call the request took part in


@dataclass
class BatcherStats:
    """Counters since start (windows, not requests)."""

    submitted_windows: int = 0
    run_windows: int = 0  # windows that went through a successful engine call
    dropped_windows: int = 0  # queued windows never run: their request was cancelled, expired or failed
    batches: int = 0  # successful engine calls
    failed_batches: int = 0


class BatchObserver(Protocol):
    """Receives one call per engine batch (the metrics module implements it)."""

    def observe_batch(self, size: int, seq_len: int, real_tokens: int, infer_ns: int, ok: bool) -> None: ...


@dataclass(eq=False)
class _Job:
    windows: Sequence[Window]
    deadline_ns: int | None
    future: asyncio.Future[WindowLogits]
    submitted_ns: int
    queued: int  # windows still waiting in the queue
    start_rows: list[np.ndarray | None] = field(default_factory=list)
    end_rows: list[np.ndarray | None] = field(default_factory=list)
    remaining: int = 0  # windows whose logits have not arrived
    infer_ns: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    request_id: str = field(default_factory=current_request_id)  # for the log of a failed batch

    @property
    def live(self) -> bool:
        return not self.future.done()


@dataclass(eq=False)
class _Item:
    job: _Job
    index: int  # which of the job's windows
    order: int  # global arrival order, for first come, first served across buckets
    enqueued_ns: int


class Batcher:
    """Batches windows for one model; `engines` are its contexts (each runs one batch at a time)."""

    def __init__(
        self,
        engines: Sequence[Engine],
        featurizer: Featurizer,
        config: BatcherConfig | None = None,
        observer: BatchObserver | None = None,
        name: str = "",
    ) -> None:
        if not engines:
            raise ValueError("a batcher needs at least one engine context")
        self.config = config or BatcherConfig()
        self.name = name or engines[0].meta.model_id
        self.max_batch_size = min(self.config.max_batch_size, min(engine.meta.max_batch_size for engine in engines))
        self._engines = list(engines)
        self._featurizer = featurizer
        self._observer = observer
        self._buckets: dict[int, deque[_Item]] = {}
        self._depth = 0  # live queued windows (cancelled or failed requests' windows excluded)
        self._order = itertools.count()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._workers: list[asyncio.Task[None]] = []
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{self.name}-{index}")
            for index in range(len(engines))
        ]
        self._busy = 0
        self.stats = BatcherStats()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start one worker task per engine context (call from the event loop that will submit)."""
        if self._workers:
            return
        for engine, executor in zip(self._engines, self._executors, strict=True):
            self._workers.append(asyncio.create_task(self._work(engine, executor), name=f"batcher-{self.name}"))

    async def close(self) -> None:
        """Refuse new work, run what is queued (unless dropped), stop the workers and their threads.

        The engines themselves stay open: whoever loaded them closes them.
        """
        self._closing = True
        self._wakeup.set()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        self._fail_queued(NotServingError("server is shutting down"))
        for executor in self._executors:
            executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        """Windows waiting to run (excluding dropped work)."""
        return self._depth

    @property
    def busy_contexts(self) -> int:
        return self._busy

    # -- submitting --------------------------------------------------------------------------------

    async def run(self, windows: Sequence[Window], deadline_ns: int | None = None) -> WindowLogits:
        """Queue `windows` and wait for their logits.

        `deadline_ns` is a `time.perf_counter_ns()` instant: work not started by then is dropped and
        the call raises `DeadlineExpiredError`. Cancelling the awaiting task drops queued windows.
        """
        if deadline_ns is not None and time.perf_counter_ns() >= deadline_ns:
            raise DeadlineExpiredError("deadline exceeded before the request was queued")
        future = self.submit(windows, deadline_ns)
        try:
            if deadline_ns is None:
                return await future
            try:
                async with asyncio.timeout((deadline_ns - time.perf_counter_ns()) / 1e9):
                    return await future
            except TimeoutError:
                raise DeadlineExpiredError("deadline exceeded before the answer was ready") from None
        finally:
            # Cancelled or timed out: mark the job dead so its windows never reach the engine.
            future.cancel()

    def submit(self, windows: Sequence[Window], deadline_ns: int | None = None) -> asyncio.Future[WindowLogits]:
        """Queue `windows` now; the returned future resolves with their logits (cancel it to drop them)."""
        if self._closing:
            raise NotServingError("server is shutting down")
        if not windows:
            raise ValueError("no windows to run")
        count = len(windows)
        # A request larger than the whole queue is still admitted when the queue is empty, so no valid
        # request (a very long passage) is refused forever.
        if self._depth + count > self.config.max_queue_windows and self._depth > 0:
            raise QueueFullError(
                f"server overloaded: {self._depth} windows queued, {count} more would exceed "
                f"the limit of {self.config.max_queue_windows}; retry later"
            )
        now = time.perf_counter_ns()
        future: asyncio.Future[WindowLogits] = asyncio.get_running_loop().create_future()
        job = _Job(
            windows=windows,
            deadline_ns=deadline_ns,
            future=future,
            submitted_ns=now,
            queued=count,
            start_rows=[None] * count,
            end_rows=[None] * count,
            remaining=count,
        )
        future.add_done_callback(lambda _: self._release(job))
        for index, window in enumerate(windows):
            bucket = -(-window.seq_len // self.config.bucket_tokens)
            self._buckets.setdefault(bucket, deque()).append(_Item(job, index, next(self._order), now))
        self._depth += count
        self.stats.submitted_windows += count
        self._wakeup.set()
        return future

    def _release(self, job: _Job) -> None:
        """A finished, failed or cancelled job's queued windows no longer count (they are skipped)."""
        self._depth -= job.queued
        self.stats.dropped_windows += job.queued
        job.queued = 0

    # -- batching ----------------------------------------------------------------------------------

    async def _work(self, engine: Engine, executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            windows = [item.job.windows[item.index] for item in batch]
            self._busy += 1
            try:
                start, end, seq_len, infer_ns = await loop.run_in_executor(executor, self._infer, engine, windows)
                self.stats.batches += 1
                self.stats.run_windows += len(batch)
                self._observe(len(batch), seq_len, windows, infer_ns, ok=True)
                self._deliver(batch, start, end, infer_ns)
            except Exception as exc:
                self._fail_batch(batch, windows, exc)
            finally:
                self._busy -= 1

    def _fail_batch(self, batch: list[_Item], windows: list[Window], exc: Exception) -> None:
        """Every request with a window in the failed batch fails (a worker never dies of one batch)."""
        jobs = {id(item.job): item.job for item in batch}
        log.error(
            "engine %s failed on a batch of %d windows (requests %s)",
            self.name,
            len(batch),
            ", ".join(job.request_id for job in jobs.values()),
            exc_info=exc,
        )
        self.stats.failed_batches += 1
        self._observe(len(batch), max(window.seq_len for window in windows), windows, 0, ok=False)
        failure = BatchFailedError(f"inference failed on a batch of {len(batch)} windows: {exc}")
        for job in jobs.values():
            if job.live:
                job.future.set_exception(failure)

    def _infer(self, engine: Engine, windows: list[Window]) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Runs on the context's executor thread: pad, infer, time."""
        begin = time.perf_counter_ns()
        inputs = self._featurizer.batch(windows)
        outputs = engine.infer(inputs)
        return outputs.start_logits, outputs.end_logits, inputs.seq_len, time.perf_counter_ns() - begin

    def _deliver(self, batch: list[_Item], start: np.ndarray, end: np.ndarray, infer_ns: int) -> None:
        seen: set[int] = set()
        for row, item in enumerate(batch):
            job = item.job
            if id(job) not in seen:
                seen.add(id(job))
                job.infer_ns += infer_ns
                job.batch_sizes.append(len(batch))
            if not job.live:
                continue
            job.start_rows[item.index] = start[row]
            job.end_rows[item.index] = end[row]
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(self._assemble(job))

    @staticmethod
    def _assemble(job: _Job) -> WindowLogits:
        rows = len(job.windows)
        width = max(row.shape[0] for row in job.start_rows if row is not None)
        start = np.full((rows, width), -np.inf, dtype=np.float32)
        end = np.full((rows, width), -np.inf, dtype=np.float32)
        for index in range(rows):
            start_row, end_row = job.start_rows[index], job.end_rows[index]
            assert start_row is not None and end_row is not None
            start[index, : start_row.shape[0]] = start_row
            end[index, : end_row.shape[0]] = end_row
        in_batcher = time.perf_counter_ns() - job.submitted_ns
        return WindowLogits(start, end, max(0, in_batcher - job.infer_ns), job.infer_ns, tuple(job.batch_sizes))

    def _observe(self, size: int, seq_len: int, windows: list[Window], infer_ns: int, ok: bool) -> None:
        if self._observer is not None:
            self._observer.observe_batch(size, seq_len, sum(w.seq_len for w in windows), infer_ns, ok)

    async def _next_batch(self) -> list[_Item] | None:
        """Wait until a batch is due (full, or its oldest window waited long enough) and take it."""
        delay_ns = self.config.max_queue_delay_us * 1_000
        while True:
            oldest = self._oldest_live()
            if oldest is None:
                if self._closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            due_ns = oldest.enqueued_ns + delay_ns
            now = time.perf_counter_ns()
            if self._depth < self.max_batch_size and now < due_ns and not self._closing:
                self._wakeup.clear()
                try:
                    async with asyncio.timeout((due_ns - now) / 1e9):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
                continue
            batch = self._take(oldest)
            if batch:
                return batch

    def _oldest_live(self) -> _Item | None:
        """The longest-waiting live window (dead ones at bucket heads are discarded on the way)."""
        oldest: _Item | None = None
        for bucket in list(self._buckets):
            queue = self._buckets[bucket]
            while queue and not queue[0].job.live:
                queue.popleft()
            if not queue:
                del self._buckets[bucket]
            elif oldest is None or queue[0].order < oldest.order:
                oldest = queue[0]
        return oldest

    def _take(self, oldest: _Item) -> list[_Item]:
        """Up to `max_batch_size` live, unexpired windows: the oldest one's bucket first, then shorter ones."""
        first_bucket = -(-oldest.job.windows[oldest.index].seq_len // self.config.bucket_tokens)
        buckets = [first_bucket, *sorted((b for b in self._buckets if b < first_bucket), reverse=True)]
        now = time.perf_counter_ns()
        batch: list[_Item] = []
        for bucket in buckets:
            queue = self._buckets.get(bucket)
            while queue and len(batch) < self.max_batch_size:
                item = queue.popleft()
                job = item.job
                if not job.live:
                    continue
                if job.deadline_ns is not None and now >= job.deadline_ns:
                    job.future.set_exception(DeadlineExpiredError("deadline exceeded while queued; work dropped"))
                    continue
                job.queued -= 1
                self._depth -= 1
                batch.append(item)
            if queue is not None and not queue:
                del self._buckets[bucket]
            if len(batch) >= self.max_batch_size:
                break
        return batch

    def _fail_queued(self, error: Exception) -> None:
        for queue in self._buckets.values():
            for item in queue:
                if item.job.live:
                    item.job.future.set_exception(error)
        self._buckets.clear()
