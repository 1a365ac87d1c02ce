"""Dynamic batching with fair scheduling: windows from many concurrent callers share engine calls.

The batcher sees windows, not requests. A request submits its windows (one per passage chunk) and
awaits their results: logits, or, where the engine searches answer spans on the device and the request
asks for it (`span_length`), a few span candidates per window (`qacore.window_results`, the path
`QuestionAnswerer` takes too). A batch holds windows of one kind only (logits, or spans of one longest
answer length); worker tasks (one per engine context, each with its own single executor
thread, so the event loop never blocks on inference) take up to `max_batch_size` windows per call. Where
the engine launches its span search without waiting (`Engine.launches_spans`: the torch engine on a GPU,
spinning), a worker launches it from the event loop and polls for it instead, with no thread hop; batches
of callers with a backlog still go to the thread (at a lower CPU priority, below).
A batch starts at once when no other batch is running (an idle engine never waits for a fuller batch:
windows that arrive while it runs form the next one); while another batch runs, it starts when it is full or
when its oldest window has waited `max_queue_delay_us`.

Fairness. Every request belongs to a *caller*: one unary call, or one `AnswerStream` (all of a
stream's questions are one caller). Batches are formed round-robin over callers, one window per
caller per round, so a caller with a huge backlog (the largest passage the limits allow, a stream
flooding questions) gets one share of each batch and of the engine, never all of it: another caller's small
request runs in the next batch, not after the backlog. With two or more engine contexts, callers
with a backlog (more windows outstanding than one batch holds and than BACKLOG_MIN_WINDOWS, or more
requests in flight than one batch holds) may together lead batches on all contexts but one, which is
kept for the other callers, so a small request never waits behind a backlog's engine call either.
Backlog callers also yield: they start no batch while another caller's batch runs or within 10 ms after one
ended (but at least one every 200 ms, so a backlog always progresses), and their batches run at a lower CPU
priority (Linux nice 19), so neither the engine nor the operating system slows the small requests down much.

Padding is limited by bucketing windows by length (`qacore.batching.length_bucket`): the batch's
leading window fixes the bucket and only windows of that bucket or shorter ones join it.

The queue is bounded (`max_queue_windows`); a request is refused with `QueueFullError` only when the
queue is over its bound *and* its caller already holds at least its fair share of it (the bound
divided among the callers with queued work), so one caller's backlog never gets others refused.
A request needing more than `max_request_windows` windows is refused with `InvalidRequestError`.
Work of requests that were cancelled or whose deadline passed is dropped before it runs, and a failed
engine call fails every request that had a window in it with `BatchFailedError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from realtime_qa.qacore.batching import LogitsTable, length_bucket, real_tokens
from realtime_qa.qacore.engine import Engine
from realtime_qa.qacore.features import Featurizer, Window
from realtime_qa.qacore.window_results import (
    BatchResult,
    ResultsTable,
    infer_batch,
    launch_batch,
    results_table,
    scatter_results,
    whole_results,
)
from realtime_qa.services.config import BatcherConfig
from realtime_qa.services.errors import (
    BatchFailedError,
    DeadlineExpiredError,
    InvalidRequestError,
    NotServingError,
    QueueFullError,
)
from realtime_qa.services.logctx import current_request_id

log = logging.getLogger(__name__)

# Callers with a backlog yield to the others: they start no batch while another caller's batch runs or
# within LIGHT_YIELD_NS after one ended, but at least one every BACKLOG_STARVATION_NS.
LIGHT_YIELD_NS = 10_000_000
BACKLOG_STARVATION_NS = 200_000_000
BACKLOG_MIN_WINDOWS = 4  # a question of at most this many windows is never a backlog, whatever the batch size
BACKGROUND_NICE = 19  # nice increment of engine calls led by callers with a backlog (Linux threads)
_thread_nice = threading.local()


@contextlib.contextmanager
def _cpu_priority(increment: int) -> Iterator[None]:
    """Run the block at `increment` niceness above the thread's start (Linux; a no-op where the thread
    could not return to its normal priority afterwards, e.g. without CAP_SYS_NICE)."""
    if not increment or not hasattr(os, "setpriority") or getattr(_thread_nice, "stuck", False):
        yield
        return
    thread = threading.get_native_id()
    try:
        base = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, base + increment)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, thread, base)
        except OSError:  # not allowed to raise priority again: stay low, and stop changing it from now on
            _thread_nice.stuck = True


__all__ = ["BatchObserver", "Batcher", "BatcherConfig", "BatcherStats", "WindowResults"]


@dataclass(frozen=True, eq=False)
class WindowResults:
    """What the engine returned for one request's windows (rows in submission order), and where its batcher
    time went. `table` holds logits (`LogitsTable`) or the device span search's spans (`SpansTable`);
    `qacore.window_results.decode_results` decodes either."""

    table: ResultsTable
    queue_ns: int  # time in the batcher not spent in engine calls carrying this request
    infer_ns: int  # summed duration of the engine calls that carried this request's windows
    batch_sizes: tuple[int, ...]  # size of each engine call the request took part in

    @property
    def start_logits(self) -> np.ndarray:
        """float32 [windows, width]; columns past a window's length are -inf (logits requests only)."""
        return self._logits().start

    @property
    def end_logits(self) -> np.ndarray:
        return self._logits().end

    def _logits(self) -> LogitsTable:
        if not isinstance(self.table, LogitsTable):
            raise TypeError("this request ran the device span search: it has spans, not logits")
        return self.table


@dataclass
class BatcherStats:
    """Counters since start (windows, not requests)."""

    submitted_windows: int = 0
    run_windows: int = 0  # windows that went through a successful engine call
    dropped_windows: int = 0  # queued windows never run: their request was cancelled, expired or failed
    batches: int = 0  # successful engine calls
    polled_batches: int = 0  # of those, launched from the event loop and polled (`Engine.launches_spans`)
    failed_batches: int = 0


class BatchObserver(Protocol):
    """Receives one call per engine batch (the metrics module implements it)."""

    def observe_batch(self, size: int, seq_len: int, real_tokens: int, infer_ns: int, ok: bool) -> None: ...


@dataclass(eq=False)
class _Job:
    windows: Sequence[Window]
    caller: str
    deadline_ns: int | None
    future: asyncio.Future[WindowResults]
    submitted_ns: int
    span_length: int | None  # longest answer searched on the device; None: the engine returns logits
    table: ResultsTable | None = None  # made when a batch brings part of the job's windows (`Batcher._results`)
    next_index: int = 0  # the next window to hand to a batch (windows of a job run in order)
    infer_ns: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    request_id: str = field(default_factory=current_request_id)  # for the log of a failed batch

    @property
    def live(self) -> bool:
        return not self.future.done()

    @property
    def queued(self) -> int:
        return len(self.windows) - self.next_index if self.live else 0


@dataclass(eq=False)
class _Caller:
    key: str
    jobs: deque[_Job] = field(default_factory=deque)
    queued: int = 0  # live windows of this caller not yet handed to a batch
    leading: int = 0  # batches in flight led by this caller
    active: int = 0  # requests submitted and not yet finished (queued or in the engine)

    def head(self) -> _Job | None:
        """The caller's oldest job with windows still to hand out (dead or drained jobs are dropped)."""
        while self.jobs and (not self.jobs[0].live or self.jobs[0].next_index >= len(self.jobs[0].windows)):
            self.jobs.popleft()
        return self.jobs[0] if self.jobs else None


@dataclass(eq=False)
class _Batch:
    items: list[tuple[_Job, int]]  # (job, window index)
    lead: _Caller
    heavy: bool  # led by a caller with a backlog (counts against the contexts kept for others)
    span_length: int | None  # every window of the batch runs the same kind of engine call


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
        # Spans kept per window by the device span search (None: the engines return logits only).
        limits = {engine.span_search_limits() for engine in engines}
        self.span_search_limits = limits.pop() if len(limits) == 1 else None
        # Contexts that callers with a backlog may lead batches on; the rest stay free for the others.
        self.heavy_contexts = max(1, len(engines) - 1)
        self._engines = list(engines)
        self._featurizer = featurizer
        self._observer = observer
        self._callers: OrderedDict[str, _Caller] = OrderedDict()  # rotation order: the next lead first
        self._depth = 0  # live queued windows (cancelled or failed requests' windows excluded)
        self._heavy_running = 0  # batches in flight led by callers with a backlog
        self._light_running = 0  # batches in flight led by the other callers
        self._light_ended_ns = -BACKLOG_STARVATION_NS  # when the last of the latter ended
        self._heavy_started_ns = -BACKLOG_STARVATION_NS
        self._anonymous = itertools.count()
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

    async def close(self, timeout_s: float | None = None) -> bool:
        """Refuse new work, run what is queued (unless dropped or abandoned), stop the workers and threads.

        With `timeout_s`, an engine call still running after it is not waited for (its thread finishes on
        its own); returns whether everything stopped. The engines themselves stay open: whoever loaded
        them closes them, and only after this returned True.
        """
        self._closing = True
        self._wakeup.set()
        stopped = True
        if self._workers:
            _, running = await asyncio.wait(self._workers, timeout=timeout_s)
            for worker in running:
                worker.cancel()
            stopped = not running
        self._fail_queued(NotServingError("server is shutting down"))
        for executor in self._executors:
            executor.shutdown(wait=stopped)
        return stopped

    def abandon(self) -> None:
        """Shutdown past its grace period: refuse new work and fail what is queued (UNAVAILABLE) instead of
        running it; engine calls already running finish."""
        self._closing = True
        self._fail_queued(NotServingError("server is shutting down: the request's work was not run"))
        self._wakeup.set()

    @property
    def depth(self) -> int:
        """Windows waiting to run (excluding dropped work)."""
        return self._depth

    @property
    def busy_contexts(self) -> int:
        return self._busy

    def queued_by_caller(self) -> dict[str, int]:
        """Windows waiting to run, by caller (unary calls are "#<n>", streams "stream:<id>:...")."""
        return {key: entry.queued for key, entry in self._callers.items() if entry.queued}

    # -- submitting --------------------------------------------------------------------------------

    async def run(
        self,
        windows: Sequence[Window],
        deadline_ns: int | None = None,
        caller: str | None = None,
        span_length: int | None = None,
    ) -> WindowResults:
        """Queue `windows` and wait for their results: logits, or with `span_length` (the longest answer in
        tokens, within the engines' `span_search_limits`) the device span search's spans.

        `caller` groups requests for fair scheduling (one stream's questions share one key); None makes
        the request its own caller. `deadline_ns` is a `time.perf_counter_ns()` instant: work not started
        by then is dropped and the call raises `DeadlineExpiredError`. Cancelling the awaiting task drops
        queued windows.
        """
        if deadline_ns is not None and time.perf_counter_ns() >= deadline_ns:
            raise DeadlineExpiredError("deadline exceeded before the request was queued")
        future = self.submit(windows, deadline_ns, caller, span_length)
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

    def submit(
        self,
        windows: Sequence[Window],
        deadline_ns: int | None = None,
        caller: str | None = None,
        span_length: int | None = None,
    ) -> asyncio.Future[WindowResults]:
        """Queue `windows` now; the returned future resolves with their results (cancel it to drop them)."""
        if self._closing:
            raise NotServingError("server is shutting down")
        if not windows:
            raise ValueError("no windows to run")
        if span_length is not None and (
            self.span_search_limits is None or not 1 <= span_length <= self.span_search_limits[1]
        ):
            raise ValueError(f"the engines cannot search spans of up to {span_length} tokens on the device")
        count = len(windows)
        limit = self.config.max_request_windows
        if count > limit:
            raise InvalidRequestError(
                f"the passage needs {count:,} windows for this question; the limit is {limit:,} per question "
                "(split the passage)"
            )
        key = caller if caller is not None else f"#{next(self._anonymous)}"
        entry = self._callers.get(key)
        self._check_room(entry, count)
        now = time.perf_counter_ns()
        future: asyncio.Future[WindowResults] = asyncio.get_running_loop().create_future()
        job = _Job(windows, key, deadline_ns, future, now, span_length)
        if entry is None:
            entry = self._callers[key] = _Caller(key)
        entry.jobs.append(job)
        entry.queued += count
        entry.active += 1
        future.add_done_callback(lambda _: self._release(job))
        self._depth += count
        self.stats.submitted_windows += count
        self._wakeup.set()
        return future

    def _check_room(self, entry: _Caller | None, count: int) -> None:
        """Refuse only a caller at or over its fair share of a queue over its bound.

        A request larger than the whole queue is still admitted when the queue is empty, so no valid
        request is refused forever.
        """
        bound = self.config.max_queue_windows
        if self._depth == 0 or self._depth + count <= bound:
            return
        own = entry.queued if entry is not None else 0
        active = sum(1 for other in self._callers.values() if other.queued) + (0 if own else 1)
        if own + count <= bound // active:
            return
        raise QueueFullError(
            f"server overloaded: {self._depth} windows queued, {count} more would exceed the limit of {bound}; "
            "retry later"
        )

    def _release(self, job: _Job) -> None:
        """A finished, failed or cancelled job's queued windows no longer count (they are skipped)."""
        entry = self._callers.get(job.caller)
        if entry is not None:
            entry.active -= 1
        left = len(job.windows) - job.next_index
        if left > 0:
            job.next_index = len(job.windows)
            self._depth -= left
            self.stats.dropped_windows += left
            if entry is not None:
                entry.queued -= left
            self._wakeup.set()
        if entry is not None:
            self._forget_if_idle(entry)

    def _forget_if_idle(self, entry: _Caller) -> None:
        if entry.queued == 0 and entry.leading == 0 and entry.active == 0 and self._callers.get(entry.key) is entry:
            del self._callers[entry.key]

    # -- batching ----------------------------------------------------------------------------------

    async def _work(self, engine: Engine, executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            windows = [job.windows[index] for job, index in batch.items]
            self._busy += 1
            try:
                if batch.span_length is not None and not batch.heavy and engine.launches_spans():
                    result, seq_len, infer_ns = await self._infer_polling(engine, windows, batch.span_length)
                    self.stats.polled_batches += 1
                else:
                    result, seq_len, infer_ns = await loop.run_in_executor(
                        executor, self._infer, engine, windows, batch.span_length, batch.heavy
                    )
                self.stats.batches += 1
                self.stats.run_windows += len(windows)
                self._deliver(batch, result, infer_ns)
                if not self._depth:  # nothing to batch next: the answers' tasks decode and write before the metrics
                    await asyncio.sleep(0)  # (with work queued, the next batch goes to the engine first)
                # After the answers are on their way: the batch metrics are not on any request's critical path.
                self._observe(len(windows), seq_len, windows, infer_ns, ok=True)
            except Exception as exc:
                self._fail_batch(batch, windows, exc)
            finally:
                self._busy -= 1
                batch.lead.leading -= 1
                if batch.heavy:
                    self._heavy_running -= 1
                else:
                    self._light_running -= 1
                    self._light_ended_ns = time.perf_counter_ns()
                self._forget_if_idle(batch.lead)
                self._wakeup.set()

    def _fail_batch(self, batch: _Batch, windows: list[Window], exc: Exception) -> None:
        """Every request with a window in the failed batch fails (a worker never dies of one batch)."""
        jobs = {id(job): job for job, _ in batch.items}
        log.error(
            "engine %s failed on a batch of %d windows (requests %s)",
            self.name,
            len(windows),
            ", ".join(job.request_id for job in jobs.values()),
            exc_info=exc,
        )
        self.stats.failed_batches += 1
        self._observe(len(windows), max(window.seq_len for window in windows), windows, 0, ok=False)
        failure = BatchFailedError(f"inference failed on a batch of {len(windows)} windows: {exc}")
        for job in jobs.values():
            if job.live:
                job.future.set_exception(failure)

    def _infer(
        self, engine: Engine, windows: list[Window], span_length: int | None, background: bool = False
    ) -> tuple[BatchResult, int, int]:
        """Runs on the context's executor thread: pad, infer (logits or the device span search), time. A batch
        led by a caller with a backlog runs at a lower CPU priority (where the OS lets the thread come back
        up), so on a busy host the operating system also favours other callers' small requests."""
        begin = time.perf_counter_ns()
        with _cpu_priority(BACKGROUND_NICE if background else 0):
            result, seq_len = infer_batch(engine, windows, self._featurizer.special.pad_id, span_length)
        return result, seq_len, time.perf_counter_ns() - begin

    async def _infer_polling(
        self, engine: Engine, windows: list[Window], span_length: int
    ) -> tuple[BatchResult, int, int]:
        """The span search launched from the event loop (pad, copies and launch: tens of microseconds) and polled
        once per loop turn until the device is done, so no thread hop sits on either side of the engine call: at
        concurrency 1 the hops cost more than the launch (benchmarks/results/serve_h200_loop_launch.md). Other
        requests run between polls; the loop spins only while the device works, as the engine thread did."""
        begin = time.perf_counter_ns()
        pending, seq_len = launch_batch(engine, windows, self._featurizer.special.pad_id, span_length)
        try:
            while not pending.ready():
                await asyncio.sleep(0)
        except BaseException:
            pending.result()  # cancelled: wait for the device, so the engine is free for the next call
            raise
        return pending.result(), seq_len, time.perf_counter_ns() - begin

    def _deliver(self, batch: _Batch, result: BatchResult, infer_ns: int) -> None:
        rows_of: dict[int, tuple[_Job, list[int], list[int]]] = {}
        for position, (job, index) in enumerate(batch.items):
            _, rows, positions = rows_of.setdefault(id(job), (job, [], []))
            rows.append(index)
            positions.append(position)
        for job, rows, positions in rows_of.values():
            job.infer_ns += infer_ns
            job.batch_sizes.append(len(batch.items))
            if not job.live:
                continue
            table = self._results(job, rows, positions, result)
            if table.complete:
                in_batcher = time.perf_counter_ns() - job.submitted_ns
                job.future.set_result(
                    WindowResults(
                        table,
                        max(0, in_batcher - job.infer_ns),
                        job.infer_ns,
                        tuple(job.batch_sizes),
                    )
                )

    def _results(self, job: _Job, rows: list[int], positions: list[int], result: BatchResult) -> ResultsTable:
        """The job's table with batch rows `positions` as its rows `rows`. Where the batch holds all of the job's
        windows, one after the other (a lone question), the device's spans are taken as they are; otherwise they
        are copied into the job's table, made on its first batch."""
        kept = self.span_search_limits[0] if self.span_search_limits is not None else 0
        count = len(job.windows)
        if len(rows) == count and positions[-1] - positions[0] == count - 1:  # rows 0..count-1: handed out in order
            whole = whole_results(result, positions[0], count, kept)
            if whole is not None:
                return whole
        if job.table is None:
            job.table = results_table(job.windows, job.span_length, kept)
        widths = [job.windows[row].seq_len for row in rows]
        scatter_results(job.table, rows, widths, result, positions)
        return job.table

    def _observe(self, size: int, seq_len: int, windows: list[Window], infer_ns: int, ok: bool) -> None:
        if self._observer is not None:
            self._observer.observe_batch(size, seq_len, real_tokens(windows), infer_ns, ok)

    def _is_heavy(self, entry: _Caller) -> bool:
        """A caller with a backlog: more windows outstanding than one batch holds (and more than
        BACKLOG_MIN_WINDOWS), or more requests in flight (a stream's questions) than one batch holds.

        Outstanding windows are the queued ones plus, while the caller leads a batch, that batch's. The
        floor keeps a question of a few windows light when batches are small (`--max-batch-size 1`):
        otherwise its second window would yield LIGHT_YIELD_NS to the caller's own previous request (a
        lone client at concurrency 1 saw 10 ms added to 2-window questions: benchmarks/results/profile_h200.md).
        """
        running = self.max_batch_size if entry.leading else 0
        backlog = max(self.max_batch_size, BACKLOG_MIN_WINDOWS)
        return entry.queued + running > backlog or entry.active > self.max_batch_size

    def _heavy_wait_ns(self, now: int) -> int:
        """How long callers with a backlog must still wait before leading a batch (0: they may now).

        They yield to the other callers: not while another caller's batch runs or within LIGHT_YIELD_NS
        after one ended (the gap between a client's consecutive small requests), unless they have not
        started a batch for BACKLOG_STARVATION_NS, so a backlog always makes progress.
        """
        if self._closing:
            return 0
        starved_at = self._heavy_started_ns + BACKLOG_STARVATION_NS
        if self._light_running:
            return max(0, starved_at - now)
        return max(0, min(self._light_ended_ns + LIGHT_YIELD_NS, starved_at) - now)

    def _eligible(self, now: int) -> list[_Caller]:
        """Callers with queued windows that may lead the next batch, in rotation order."""
        room_for_heavy = self._heavy_running < self.heavy_contexts and self._heavy_wait_ns(now) == 0
        return [
            entry
            for entry in self._callers.values()
            if entry.queued > 0 and entry.head() is not None and (room_for_heavy or not self._is_heavy(entry))
        ]

    async def _next_batch(self) -> _Batch | None:
        """Wait until a batch is due (full, or its oldest window waited long enough) and take it."""
        delay_ns = self.config.max_queue_delay_us * 1_000
        while True:
            # One clock reading per pass: with a second one, a backlog's yield could end between the two, its
            # wait come out 0 ("no timeout") and the worker sleep until the request's deadline (a lone client
            # on uvloop, whose timers fire up to ~1 ms early, hit it every few dozen calls: tests/test_uvloop_hang.py).
            now = time.perf_counter_ns()
            eligible = self._eligible(now)
            if not eligible:
                if self._closing and self._depth == 0:
                    return None
                self._wakeup.clear()
                backlog_wait_ns = self._heavy_wait_ns(now) if self._depth else 0
                await self._wait_for_wakeup(backlog_wait_ns)
                continue
            # Waiting for a fuller batch only pays while another batch keeps the engine busy: an idle engine
            # starts at once (with one context it is always idle here), and windows that arrive meanwhile
            # form the next batch. So the queue is weighed only while the engine is busy.
            engine_busy = self._heavy_running + self._light_running > 0
            if engine_busy and not self._closing:
                oldest_ns = min(job.submitted_ns for job in (entry.head() for entry in eligible) if job is not None)
                due_ns = oldest_ns + delay_ns
                now = time.perf_counter_ns()
                waiting = sum(entry.queued for entry in eligible)
                if waiting < self.max_batch_size and now < due_ns:
                    self._wakeup.clear()
                    await self._wait_for_wakeup(due_ns - now)
                    continue
            batch = self._take(eligible)
            if batch is not None:
                return batch

    async def _wait_for_wakeup(self, timeout_ns: int) -> None:
        """Until `_wakeup` is set, or `timeout_ns` passed (0: no timeout; no timer made, as at every idle wait)."""
        if not timeout_ns:
            await self._wakeup.wait()
            return
        try:
            async with asyncio.timeout(timeout_ns / 1e9):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    def _take(self, eligible: list[_Caller]) -> _Batch | None:
        """Up to `max_batch_size` windows, one per caller per round: the lead caller's window fixes the
        length bucket and the kind of engine call (logits, or spans of one longest answer); other callers
        join with windows of that kind, of that bucket or shorter ones."""
        now = time.perf_counter_ns()
        bucket_tokens = self.config.bucket_tokens
        lead: _Caller | None = None
        lead_heavy = False
        bucket = 0
        span_length: int | None = None
        items: list[tuple[_Job, int]] = []
        contributed: list[_Caller] = []
        leaders = {id(entry) for entry in eligible}
        candidates = [*eligible, *(entry for entry in self._callers.values() if id(entry) not in leaders)]
        while len(items) < self.max_batch_size:
            progress = False
            for entry in candidates:
                if len(items) >= self.max_batch_size:
                    break
                job = self._next_live_job(entry, now)
                if job is None:
                    continue
                window = job.windows[job.next_index]
                if lead is None:
                    if id(entry) not in leaders:
                        continue
                    lead, lead_heavy = entry, self._is_heavy(entry)
                    bucket = length_bucket(window.seq_len, bucket_tokens)
                    span_length = job.span_length
                elif length_bucket(window.seq_len, bucket_tokens) > bucket or job.span_length != span_length:
                    continue
                items.append((job, job.next_index))
                job.next_index += 1
                entry.queued -= 1
                self._depth -= 1
                if entry not in contributed:  # at most max_batch_size entries
                    contributed.append(entry)
                progress = True
            if not progress:
                break
        if lead is None:
            return None
        lead.leading += 1
        if lead_heavy:
            self._heavy_running += 1
            self._heavy_started_ns = now
        else:
            self._light_running += 1
        for entry in contributed:  # round robin: callers that were served go to the back
            if self._callers.get(entry.key) is entry:
                self._callers.move_to_end(entry.key)
        return _Batch(items, lead, lead_heavy, span_length)

    def _next_live_job(self, entry: _Caller, now: int) -> _Job | None:
        """The caller's next job with a window to run; expired jobs fail on the way."""
        while True:
            job = entry.head()
            if job is None:
                return None
            if job.deadline_ns is not None and now >= job.deadline_ns:
                job.future.set_exception(DeadlineExpiredError("deadline exceeded while queued; work dropped"))
                continue  # the done callback released its windows
            return job

    def _fail_queued(self, error: Exception) -> None:
        for entry in list(self._callers.values()):
            for job in list(entry.jobs):
                if job.live:
                    job.future.set_exception(error)
        self._callers.clear()
