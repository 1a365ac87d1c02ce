"""The qa.v1.QuestionAnswering servicer: requests become windows for the batcher, logits become answers.

Per question: tokenize the question, find (or tokenize and cache) the passage, cut windows, let the
model's batcher run them with other requests' windows, decode the spans. The engine path is the one
`QuestionAnswerer` (`qa-eval`, `qa-assistant`) takes (`qacore.window_results`): where the engine searches
answer spans on the device (the torch engine) and the question's decoder options fit its search, the
batcher brings back a few span candidates per window and decoding only ranks them; otherwise it brings
back logits and the vectorized CPU decoder searches them (`--no-span-search` forces the latter).

Short passages are tokenized and decoded on the event loop; long ones on a small executor, so one huge
passage never stalls every other request. Measured on the 2-core CPU host (`qa-bench serve
--compare-batching` records it as `cpu_offload`): a SQuAD question with its windows takes ~45 us inline
and ~170-210 us through an executor (the thread hop alone costs ~80 us), a SQuAD paragraph ~220 us
inline, decoding logits ~0.5 ms per window. Inline wins below a few milliseconds of work.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from realtime_qa.qacore.features import EncodedPassage, Features, window_spans
from realtime_qa.qacore.latency import LatencyTracker
from realtime_qa.qacore.window_results import SpansTable, decode_results, span_search_length
from realtime_qa.services.auth import caller_scope
from realtime_qa.services.config import ServerConfig
from realtime_qa.services.convert import (
    QuestionRequest,
    ServedAnswer,
    answer_to_pb,
    check_model_id,
    error_to_pb,
    model_info_to_pb,
    request_from_pb,
)
from realtime_qa.services.errors import InvalidRequestError, NotServingError, is_expected, status_of
from realtime_qa.services.interceptors import CallTracker, InvalidMessage
from realtime_qa.services.logctx import MAX_REQUEST_ID_CHARS, current_request_id, escape_log_text, request_context
from realtime_qa.services.metrics import ServiceMetrics
from realtime_qa.services.models import ModelRegistry, ModelRuntime
from realtime_qa.services.passages import PassageStore

from realtime_qa.qa.v1 import qa_pb2, qa_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
SERVICE_NAME = qa_pb2.DESCRIPTOR.services_by_name["QuestionAnswering"].full_name
STREAM_QUESTION = "AnswerStream"  # metrics label of one question answered (or failed) in-band on a stream
INLINE_DECODE_WINDOWS = 2  # decoding logits takes ~0.5 ms per window: more than this goes to the executor
# Ranking device spans costs ~0.14 ms per SQuAD question on the 2-core box (decode_cpu_bench: 1-2 windows),
# and grows only with the candidates read (k per window) until n-best distinct spans are found.
INLINE_SPAN_DECODE_WINDOWS = 16
EAGER_TASKS = sys.version_info >= (3, 12)  # asyncio.Task(eager_start=True)
STOP_READ_SETTLE_S = 0.2  # on shutdown, how long a stream's pending read may still deliver what already arrived


class QuestionAnsweringService(qa_pb2_grpc.QuestionAnsweringServicer):
    """The RPC methods hold only their own logic: request ids, in-flight counting and drain refusal, error
    mapping and metrics are the interceptors' (`services.interceptors`)."""

    def __init__(
        self,
        models: ModelRegistry,
        passages: PassageStore,
        metrics: ServiceMetrics,
        config: ServerConfig,
        cpu_executor: ThreadPoolExecutor,
        calls: CallTracker | None = None,
    ) -> None:
        self.models = models
        self.passages = passages
        self.metrics = metrics
        self.config = config
        self.cpu_executor = cpu_executor
        self.calls = calls or CallTracker()
        self.streams: set[StreamSession] = set()
        self.calls.on_drain(self._drain_streams)

    @property
    def draining(self) -> bool:
        return self.calls.draining

    def _drain_streams(self) -> None:
        """Shutdown began: open streams stop reading and finish the questions they have read."""
        for stream in list(self.streams):
            stream.drain()

    # -- RPCs --------------------------------------------------------------------------------------

    async def Answer(  # noqa: N802 - gRPC method name
        self, request: qa_pb2.AnswerRequest, context: grpc.aio.ServicerContext
    ) -> qa_pb2.AnswerResponse:
        arrival_ns = time.perf_counter_ns()
        query = request_from_pb(request)
        answer = await self.answer(query, arrival_ns, self._deadline_ns(context, query, arrival_ns))
        return answer_to_pb(answer)

    async def AnswerStream(  # noqa: N802 - gRPC method name
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> None:
        await StreamSession(self, current_request_id(), context).run(request_iterator)

    async def PutPassage(  # noqa: N802 - gRPC method name
        self, request: qa_pb2.PutPassageRequest, context: grpc.aio.ServicerContext
    ) -> qa_pb2.PutPassageResponse:
        check_model_id(request.model_id)
        model = self.model_for(request.model_id)
        passage_id, passage = await self._passage(model, request.passage, None, share=True)
        config = model.featurizer.config
        spans = window_spans(len(passage), config.max_seq_length - 1 - 3, config.doc_stride)
        return qa_pb2.PutPassageResponse(passage_id=passage_id, num_tokens=len(passage), num_windows=len(spans))

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: qa_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> qa_pb2.ListModelsResponse:
        default = self.models.default_id
        return qa_pb2.ListModelsResponse(
            models=[model_info_to_pb(model, model.model_id == default) for model in self.models]
        )

    async def GetModelInfo(  # noqa: N802 - gRPC method name
        self, request: qa_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> qa_pb2.ModelInfo:
        check_model_id(request.model_id)
        model = self.models.lookup(request.model_id)
        return model_info_to_pb(model, model.model_id == self.models.default_id)

    def model_for(self, model_id: str) -> ModelRuntime:
        """The model to answer with: NOT_FOUND if unknown (one rule for every RPC), UNAVAILABLE if not ready."""
        if not len(self.models):
            raise NotServingError("server is starting: no model is loaded yet")
        model = self.models.lookup(model_id)
        if not model.ready:
            raise NotServingError(f"model {model.model_id} is not ready")
        return model

    # -- answering ---------------------------------------------------------------------------------

    async def answer(
        self, query: QuestionRequest, arrival_ns: int, deadline_ns: int | None, caller: str | None = None
    ) -> ServedAnswer:
        """Answer one validated question; raises the errors `services.errors.status_of` maps."""
        tracker = LatencyTracker(self.config.budget_ns, start_ns=arrival_ns)
        model = self.model_for(query.model_id)
        decoder_config = query.decoder_config(model.decoder_config)
        span_length = span_search_length(model.engines[0], decoder_config) if self.config.span_search else None
        with tracker.stage("tokenize"):
            question_ids = model.featurizer.encode_question(query.question)
            passage_id, passage = await self._passage(model, query.passage, query.passage_id)
            long_passage = len(passage.text) > self.config.inline_tokenize_chars
            windows = await self._cpu(long_passage, model.featurizer.windows, question_ids, passage)
        results = await model.batcher.run(windows, deadline_ns, caller, span_length)
        tracker.add("queue", results.queue_ns)
        tracker.add("infer", results.infer_ns)
        features = Features(passage, question_ids, windows)
        inline = INLINE_SPAN_DECODE_WINDOWS if isinstance(results.table, SpansTable) else INLINE_DECODE_WINDOWS
        with tracker.stage("decode"):
            prediction = await self._cpu(len(windows) > inline, decode_results, features, results.table, decoder_config)
        timings = tracker.finish()
        # Observed once the answer is on its way (the next event-loop turn): histograms are not on its critical path.
        asyncio.get_running_loop().call_soon(self.metrics.observe_answer, model.model_id, timings)
        log.debug(
            "answered in %.2f ms (%d windows, batches %s)", timings.total_ns / 1e6, len(windows), results.batch_sizes
        )
        return ServedAnswer(query.tag, prediction, model.model_id, model.engine_name, passage_id, timings)

    async def _passage(
        self, model: ModelRuntime, text: str | None, passage_id: str | None, share: bool = False
    ) -> tuple[str, EncodedPassage]:
        """The passage's id and tokens for `model`: from the store, or tokenized now (and kept).

        Ids are scoped to the authenticated caller (`services.auth.caller_scope`): another tenant's id is
        NOT_FOUND. Passages stored with PutPassage (`share`) also go to the shared store (--passage-store),
        so any replica answers by their id; passages sent with a question stay in this process's cache.
        """
        scope = caller_scope.get()
        offload = self.config.inline_tokenize_chars
        if passage_id is not None:
            text, cached = await self.passages.lookup(scope, passage_id, model.model_id)  # NOT_FOUND if unknown
            if cached is not None:
                return passage_id, cached
            encoded = await self._cpu(len(text) > offload, model.featurizer.encode_passage, text)
            await self.passages.add_encoding(scope, passage_id, model.model_id, encoded)
            return passage_id, encoded
        assert text is not None
        passage_id = PassageStore.id_of(text)
        cached = self.passages.cached_encoding(scope, passage_id, model.model_id)
        encoded = (
            cached
            if cached is not None
            else await self._cpu(len(text) > offload, model.featurizer.encode_passage, text)
        )
        if cached is None or share:
            await self.passages.store(scope, text, model.model_id, encoded, shared=share)
        return passage_id, encoded

    async def _cpu(self, offload: bool, function: Callable[..., T], *args: Any) -> T:
        """Run CPU work inline (small inputs: no thread hop) or on the executor (large ones: loop stays free)."""
        if not offload:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(self.cpu_executor, function, *args)

    # -- helpers -----------------------------------------------------------------------------------

    def _deadline_ns(self, context: grpc.aio.ServicerContext, query: QuestionRequest, arrival_ns: int) -> int | None:
        """The earlier of the call's gRPC deadline and the question's timeout_ms (perf_counter_ns), or None."""
        deadlines = []
        remaining_s = context.time_remaining()
        if remaining_s is not None:
            deadlines.append(time.perf_counter_ns() + int(remaining_s * 1e9))
        if query.timeout_ms is not None:
            deadlines.append(arrival_ns + query.timeout_ms * 1_000_000)
        return min(deadlines) if deadlines else None


def start_task(coroutine: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
    """A task that runs `coroutine` at once, up to its first wait, where Python has eager tasks (3.12+): a stream's
    question is tokenized and queued before the stream reads its next message, not one event-loop turn later."""
    if EAGER_TASKS:
        return asyncio.Task(coroutine, loop=asyncio.get_running_loop(), name=name, eager_start=True)  # type: ignore[call-arg]
    return asyncio.create_task(coroutine, name=name)


class StreamSession:
    """One AnswerStream call: questions are answered concurrently and written back as each completes.

    The call's own task reads. Each question is answered in a task of its own (started eagerly, see
    `start_task`), which writes its answer itself: gRPC allows one write at a time, so writes take turns on
    a lock, and no queue or writer task sits between an answer and the transport.

    At most `max_stream_questions` questions are in flight (read but their answer not yet written):
    the session reads the next question only when one is written, so a client that floods without
    reading its answers is held back by gRPC flow control and its memory stays bounded. All of the
    stream's questions are one caller for the batcher's fair scheduling.

    On shutdown the session stops reading (a read already waiting gets STOP_READ_SETTLE_S to deliver
    what has arrived), answers every question it has read (within the grace period), and then ends the
    stream: OK if the client had already half-closed and every question was answered, otherwise
    UNAVAILABLE, so the client knows that questions without an answer were not processed. A write that
    fails ends the stream with that failure; the questions still in flight are cancelled.
    """

    def __init__(self, service: QuestionAnsweringService, stream_id: str, context: grpc.aio.ServicerContext) -> None:
        self.service = service
        self.stream_id = stream_id
        self.caller = f"stream:{stream_id}:{id(self):x}"
        self.context = context
        self.slots = asyncio.Semaphore(service.config.max_stream_questions)
        self.write_lock = asyncio.Lock()
        self.pending: set[asyncio.Task[None]] = set()
        self.stopped = False  # shutdown began: read no further
        self.half_closed = False
        self.read = 0
        self.written = 0
        self.write_failure: Exception | None = None
        self._reader: asyncio.Task[Any] | None = None  # the call's task, which reads
        self._waiting: str | None = None  # where the reader waits: "read", "slot", or None (not interruptible)
        self._interrupted = False  # the reader was cancelled to stop reading (not the call)
        self._settle: asyncio.TimerHandle | None = None

    def drain(self) -> None:
        """Shutdown began: read no further. A read already waiting may still deliver for STOP_READ_SETTLE_S: a
        client that already half-closed has its end of stream (or last question) in the transport, and on a
        loaded host the signal can be handled first; such a stream is finished, not refused."""
        if self.stopped:
            return
        self.stopped = True
        if self._waiting == "read":
            self._settle = asyncio.get_running_loop().call_later(STOP_READ_SETTLE_S, self._interrupt_reading)
        else:
            self._interrupt_reading()

    def _interrupt_reading(self) -> None:
        """Cancel the reader's wait for a message or a slot (nothing else of the call is interrupted)."""
        if self._waiting is not None and self._reader is not None and not self._interrupted:
            self._interrupted = True
            self._reader.cancel()

    async def run(self, request_iterator: Any) -> None:
        self._reader = asyncio.current_task()
        self.service.streams.add(self)
        if self.service.draining:  # shutdown began while the call was starting: `drain()` did not see us
            self.drain()
        try:
            await self._read(request_iterator)
            # Half-closed, shutting down or a write failed: finish what is in flight (never cancelled from here,
            # unless a write fails), then end.
            while self.pending and self.write_failure is None:
                await asyncio.wait(set(self.pending), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            log.info(
                "stream cancelled: %d of %d questions answered, %d in flight dropped",
                self.written, self.read, len(self.pending),
            )  # fmt: skip
            raise
        finally:
            self.service.streams.discard(self)
            if self._settle is not None:
                self._settle.cancel()
            for task in list(self.pending):
                task.cancel()
        if self.write_failure is not None:
            raise self.write_failure
        if self.stopped and not self.half_closed:
            log.info("stream ended by shutdown after writing %d answers to %d questions", self.written, self.read)
            raise NotServingError(
                "server is shutting down: questions on this stream without an answer were not processed; "
                "send them again on a new stream"
            )
        if self.stopped:
            log.info("stream finished during shutdown: %d answers written to %d questions", self.written, self.read)

    async def _interruptible(self, awaitable: Awaitable[T], where: str) -> T | None:
        """The result (a message, or True for a slot: never None), or None when shutdown or a failed write stopped
        the reading meanwhile."""
        self._waiting = where
        try:
            return await awaitable
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._interrupted or task is None or task.uncancel() > 0:  # the call itself was cancelled
                raise
            return None
        finally:
            self._waiting = None

    async def _read(self, request_iterator: Any) -> None:
        iterator = aiter(request_iterator)
        while not self.stopped and self.write_failure is None:
            if self.slots.locked():  # all slots taken: wait for an answer to be written (or shutdown)
                if await self._interruptible(self.slots.acquire(), "slot") is None:
                    return
            else:
                await self.slots.acquire()  # a free slot: taken at once, without waiting
            try:
                request = await self._interruptible(anext(iterator), "read")
            except StopAsyncIteration:
                self.slots.release()
                self.half_closed = True
                return
            if request is None:
                self.slots.release()
                return
            task = start_task(self._answer_one(request, time.perf_counter_ns(), self.read))
            self.read += 1
            if not task.done():
                self.pending.add(task)
                task.add_done_callback(self.pending.discard)

    async def _answer_one(self, request: qa_pb2.AnswerRequest | InvalidMessage, arrival_ns: int, index: int) -> None:
        service = self.service
        tag = request.request_id if isinstance(request, qa_pb2.AnswerRequest) else ""
        if len(tag) > MAX_REQUEST_ID_CHARS:
            tag = tag[:MAX_REQUEST_ID_CHARS]
        with request_context(f"{self.stream_id}/{escape_log_text(tag, MAX_REQUEST_ID_CHARS) or index}"):
            try:
                if isinstance(request, InvalidMessage):
                    raise InvalidRequestError(request.message)
                query = request_from_pb(request)
                deadline_ns = service._deadline_ns(self.context, query, arrival_ns)
                answer = await service.answer(query, arrival_ns, deadline_ns, self.caller)
            except asyncio.CancelledError:
                service.metrics.count_request(STREAM_QUESTION, "CANCELLED")
                raise
            except Exception as exc:
                code, message = status_of(exc)
                if is_expected(exc):
                    log.info("stream question failed: %s: %s", code.name, escape_log_text(message, 500))
                else:
                    log.error("stream question failed unexpectedly: %s", message, exc_info=exc)
                service.metrics.count_request(STREAM_QUESTION, code.name)
                await self._write(error_to_pb(tag, code, message))
                return
            service.metrics.count_request(STREAM_QUESTION, "OK")
            await self._write(answer_to_pb(answer))

    async def _write(self, response: qa_pb2.AnswerResponse) -> None:
        """Write one answer (writes take turns), then free its question's slot; a failed write ends the stream."""
        async with self.write_lock:
            if self.write_failure is not None:
                return
            try:
                await self.context.write(response)
            except Exception as exc:  # the transport refused it: the stream ends with this failure
                self.write_failure = exc
                self._interrupt_reading()
                return
        self.written += 1
        self.slots.release()
