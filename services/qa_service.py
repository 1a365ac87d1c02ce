"""The qa.v1.QuestionAnswering servicer: requests become windows for the batcher, logits become answers.

Per question: tokenize the question, find (or tokenize and cache) the passage, cut windows, let the
model's batcher run them with other requests' windows, decode the spans. Short passages are
tokenized and decoded on the event loop; long ones on a small executor, so one huge passage never
stalls every other request. Measured on the 2-core CPU host (`qa-bench serve --compare-batching`
records it as `cpu_offload`): a SQuAD question with its windows takes ~45 us inline and ~170-210 us
through an executor (the thread hop alone costs ~80 us), a SQuAD paragraph ~220 us inline, decoding
~0.5 ms per window. Inline wins below a few milliseconds of work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from qa.v1 import qa_pb2, qa_pb2_grpc
from qacore.decoding import DecoderConfig, Prediction, decode
from qacore.features import EncodedPassage, Features, window_spans
from qacore.latency import LatencyTracker
from services.batcher import WindowLogits
from services.config import ServerConfig
from services.convert import (
    QuestionRequest,
    ServedAnswer,
    answer_to_pb,
    error_to_pb,
    model_info_to_pb,
    request_from_pb,
)
from services.errors import InvalidRequestError, NotServingError, is_expected, status_of
from services.logctx import REQUEST_ID_HEADER, new_request_id, request_context
from services.metrics import ServiceMetrics
from services.models import ModelRegistry, ModelRuntime
from services.passages import PassageCache

log = logging.getLogger(__name__)

T = TypeVar("T")
SERVICE_NAME = qa_pb2.DESCRIPTOR.services_by_name["QuestionAnswering"].full_name
INLINE_DECODE_WINDOWS = 2  # decoding takes ~0.5 ms per window: more than this goes to the executor


class QuestionAnsweringService(qa_pb2_grpc.QuestionAnsweringServicer):
    def __init__(
        self,
        models: ModelRegistry,
        passages: PassageCache,
        metrics: ServiceMetrics,
        config: ServerConfig,
        cpu_executor: ThreadPoolExecutor,
    ) -> None:
        self.models = models
        self.passages = passages
        self.metrics = metrics
        self.config = config
        self.cpu_executor = cpu_executor
        self.draining = False  # set on shutdown: questions arriving on open streams are refused
        self.streams: set[StreamSession] = set()
        self._in_flight = 0  # calls doing work: unary answers, passage uploads, open streams
        self._idle = asyncio.Event()
        self._idle.set()

    def drain(self) -> None:
        """Shutdown begins: refuse new calls (UNAVAILABLE) and let open streams finish what they have read."""
        self.draining = True
        for stream in list(self.streams):
            stream.drain()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is doing work (True), or `timeout_s` passed (False)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        """Count a call as in flight; while draining, refuse it before it does any work."""
        if self.draining:
            raise NotServingError("server is shutting down; retry on another server or later")
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    # -- RPCs --------------------------------------------------------------------------------------

    async def Answer(  # noqa: N802 - gRPC method name
        self, request: qa_pb2.AnswerRequest, context: grpc.aio.ServicerContext
    ) -> qa_pb2.AnswerResponse:
        arrival_ns = time.perf_counter_ns()
        request_id = request_id_of(context)
        with request_context(request_id):
            context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
            try:
                with self._working():
                    self._check_size(request)
                    query = request_from_pb(request)
                    answer = await self.answer(query, arrival_ns, self._deadline_ns(context, query, arrival_ns))
            except asyncio.CancelledError:
                log.info("Answer cancelled by the client (or its deadline)")
                self.metrics.count_request("Answer", "CANCELLED")
                raise
            except Exception as exc:
                code, message = self._failure("Answer", exc)
                await context.abort(code, message)
            self.metrics.count_request("Answer", "OK")
            return answer_to_pb(answer)

    async def AnswerStream(  # noqa: N802 - gRPC method name
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> None:
        stream_id = request_id_of(context)
        with request_context(stream_id):
            try:
                with self._working():
                    await context.send_initial_metadata(((REQUEST_ID_HEADER, stream_id),))
                    await StreamSession(self, stream_id, context).run(request_iterator)
            except NotServingError as exc:  # refused at the start (shutting down); per-question errors go in-band
                code, message = self._failure("AnswerStream", exc)
                await context.abort(code, message)

    async def PutPassage(  # noqa: N802 - gRPC method name
        self, request: qa_pb2.PutPassageRequest, context: grpc.aio.ServicerContext
    ) -> qa_pb2.PutPassageResponse:
        with request_context(request_id_of(context)):
            try:
                with self._working():
                    self._check_size(request)
                    model = self.models.for_request(request.model_id)
                    passage_id, passage = await self._passage(model, request.passage, None)
                config = model.featurizer.config
                spans = window_spans(len(passage), config.max_seq_length - 1 - 3, config.doc_stride)
            except Exception as exc:
                code, message = self._failure("PutPassage", exc)
                await context.abort(code, message)
            self.metrics.count_request("PutPassage", "OK")
            return qa_pb2.PutPassageResponse(passage_id=passage_id, num_tokens=len(passage), num_windows=len(spans))

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: qa_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> qa_pb2.ListModelsResponse:
        default = self.models.default_id
        self.metrics.count_request("ListModels", "OK")
        return qa_pb2.ListModelsResponse(
            models=[model_info_to_pb(model, model.model_id == default) for model in self.models]
        )

    async def GetModelInfo(  # noqa: N802 - gRPC method name
        self, request: qa_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> qa_pb2.ModelInfo:
        with request_context(request_id_of(context)):
            try:
                model = self.models.lookup(request.model_id)
            except Exception as exc:
                code, message = self._failure("GetModelInfo", exc)
                await context.abort(code, message)
            self.metrics.count_request("GetModelInfo", "OK")
            return model_info_to_pb(model, model.model_id == self.models.default_id)

    # -- answering ---------------------------------------------------------------------------------

    async def answer(self, query: QuestionRequest, arrival_ns: int, deadline_ns: int | None) -> ServedAnswer:
        """Answer one validated question; raises the errors `services.errors.status_of` maps."""
        tracker = LatencyTracker(self.config.budget_ns, start_ns=arrival_ns)
        model = self.models.for_request(query.model_id)
        decoder_config = query.decoder_config(model.decoder_config)
        with tracker.stage("tokenize"):
            question_ids = model.featurizer.encode_question(query.question)
            passage_id, passage = await self._passage(model, query.passage, query.passage_id)
            long_passage = len(passage.text) > self.config.inline_tokenize_chars
            windows = await self._cpu(long_passage, model.featurizer.windows, question_ids, passage)
        logits = await model.batcher.run(windows, deadline_ns)
        tracker.add("queue", logits.queue_ns)
        tracker.add("infer", logits.infer_ns)
        features = Features(passage, question_ids, windows)
        with tracker.stage("decode"):
            prediction = await self._cpu(
                len(windows) > INLINE_DECODE_WINDOWS, _decode, features, logits, decoder_config
            )
        timings = tracker.finish()
        self.metrics.observe_answer(model.model_id, timings)
        log.debug(
            "answered in %.2f ms (%d windows, batches %s)", timings.total_ns / 1e6, len(windows), logits.batch_sizes
        )
        return ServedAnswer(query.tag, prediction, model.model_id, model.engine_name, passage_id, timings)

    async def _passage(
        self, model: ModelRuntime, text: str | None, passage_id: str | None
    ) -> tuple[str, EncodedPassage]:
        """The passage's id and tokens for `model`: from the cache, or tokenized now (and cached)."""
        if passage_id is not None:
            text = self.passages.text(passage_id)  # NOT_FOUND for unknown ids
        assert text is not None
        passage_id = passage_id or PassageCache.id_of(text)
        if passage_id in self.passages:
            cached = self.passages.encoding(passage_id, model.model_id)
            if cached is not None:
                return passage_id, cached
        encoded = await self._cpu(len(text) > self.config.inline_tokenize_chars, model.featurizer.encode_passage, text)
        self.passages.put(text)
        self.passages.set_encoding(passage_id, model.model_id, encoded)
        return passage_id, encoded

    async def _cpu(self, offload: bool, function: Callable[..., T], *args: Any) -> T:
        """Run CPU work inline (small inputs: no thread hop) or on the executor (large ones: loop stays free)."""
        if not offload:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(self.cpu_executor, function, *args)

    # -- helpers -----------------------------------------------------------------------------------

    def _check_size(self, message: Any) -> None:
        size = message.ByteSize()
        if size > self.config.max_message_bytes:
            limit = self.config.max_message_bytes
            raise InvalidRequestError(f"request of {size:,} bytes exceeds the limit of {limit:,}")

    def _deadline_ns(self, context: grpc.aio.ServicerContext, query: QuestionRequest, arrival_ns: int) -> int | None:
        """The earlier of the call's gRPC deadline and the question's timeout_ms (perf_counter_ns), or None."""
        deadlines = []
        remaining_s = context.time_remaining()
        if remaining_s is not None:
            deadlines.append(time.perf_counter_ns() + int(remaining_s * 1e9))
        if query.timeout_ms is not None:
            deadlines.append(arrival_ns + query.timeout_ms * 1_000_000)
        return min(deadlines) if deadlines else None

    def _failure(self, method: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        """Log a failed call (traceback only for the unexpected), count it, and return its status."""
        code, message = status_of(exc)
        if is_expected(exc):
            log.info("%s failed: %s: %s", method, code.name, message)
        else:
            log.error("%s failed unexpectedly: %s", method, message, exc_info=exc)
        self.metrics.count_request(method, code.name)
        return code, message


def _decode(features: Features, logits: WindowLogits, config: DecoderConfig) -> Prediction:
    return decode(features, logits.start_logits, logits.end_logits, config)


class _Drain:
    """Outbox marker: the server is shutting down."""


DRAIN = _Drain()


class StreamSession:
    """One AnswerStream call: questions are answered concurrently and written back as each completes.

    On shutdown the session stops reading, answers the questions it has read, and ends the stream
    with UNAVAILABLE, so the client knows that any question without an answer was not processed.
    """

    def __init__(self, service: QuestionAnsweringService, stream_id: str, context: grpc.aio.ServicerContext) -> None:
        self.service = service
        self.stream_id = stream_id
        self.context = context
        self.outbox: asyncio.Queue[qa_pb2.AnswerResponse | _Drain | None] = asyncio.Queue()
        self.pending: set[asyncio.Task[None]] = set()

    async def run(self, request_iterator: Any) -> None:
        reader = asyncio.create_task(self._read(request_iterator), name=f"stream-reader-{self.stream_id}")
        self.service.streams.add(self)
        if self.service.draining:  # shutdown began while the call was starting: `drain()` did not see us
            self.drain()
        try:
            while True:
                response = await self.outbox.get()
                if response is None:
                    break
                if isinstance(response, _Drain):
                    await self._drain(reader)
                    return
                await self.context.write(response)
            await reader  # re-raises a failure to read the stream
        except asyncio.CancelledError:
            log.info("stream cancelled with %d questions in flight; their work is dropped", len(self.pending))
            raise
        finally:
            self.service.streams.discard(self)
            reader.cancel()
            for task in list(self.pending):
                task.cancel()

    def drain(self) -> None:
        self.outbox.put_nowait(DRAIN)

    async def _drain(self, reader: asyncio.Task[None]) -> None:
        reader.cancel()
        answered = len(self.pending)
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)
        while not self.outbox.empty():
            response = self.outbox.get_nowait()
            if isinstance(response, qa_pb2.AnswerResponse):
                await self.context.write(response)
        log.info("stream ended by shutdown after answering %d questions in flight", answered)
        await self.context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "server is shutting down: questions on this stream without an answer were not processed; "
            "send them again on a new stream",
        )

    async def _read(self, request_iterator: Any) -> None:
        index = 0
        try:
            async for request in request_iterator:
                arrival_ns = time.perf_counter_ns()
                task = asyncio.create_task(self._answer_one(request, arrival_ns, index))
                self.pending.add(task)
                task.add_done_callback(self.pending.discard)
                index += 1
            # The client half-closed: finish what is in flight, then end the stream.
            while self.pending:
                await asyncio.gather(*self.pending, return_exceptions=True)
        finally:
            self.outbox.put_nowait(None)

    async def _answer_one(self, request: qa_pb2.AnswerRequest, arrival_ns: int, index: int) -> None:
        service = self.service
        tag = request.request_id
        with request_context(f"{self.stream_id}/{tag or index}"):
            try:
                if service.draining:
                    raise NotServingError("server is shutting down; open a new stream elsewhere or later")
                service._check_size(request)
                query = request_from_pb(request)
                answer = await service.answer(query, arrival_ns, service._deadline_ns(self.context, query, arrival_ns))
            except asyncio.CancelledError:
                service.metrics.count_request("AnswerStream", "CANCELLED")
                raise
            except Exception as exc:
                code, message = service._failure("AnswerStream", exc)
                self.outbox.put_nowait(error_to_pb(tag, code, message))
                return
            service.metrics.count_request("AnswerStream", "OK")
            self.outbox.put_nowait(answer_to_pb(answer))


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's `x-request-id` metadata, or a new id."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and value:
            return value[:128]
    return new_request_id()
