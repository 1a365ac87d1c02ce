"""In-process adapters of the stage interfaces: the stages' logic called directly on this event loop.

The QA adapter calls the running QA server's service (the same batcher, passage cache and engine
that its qa.v1 clients use) without the network hop; its timings fold in exactly as over gRPC.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
from realtime_qa.pipeline.stages import QARequest, QAResult, StageError, TraceIds
from realtime_qa.services.asr_stub import AsrStub, Recognition, RecognitionError, RecognitionSettings, UtteranceFrame
from realtime_qa.services.convert import QuestionRequest
from realtime_qa.services.errors import status_of
from realtime_qa.services.logctx import request_context
from realtime_qa.services.response_service import InvalidReplyRequestError, Reply, ReplyMaker, ReplyRequest
from realtime_qa.services.server import QAServer


class LocalRecognizer:
    def __init__(self, stub: AsrStub) -> None:
        self.stub = stub

    async def recognize(
        self, settings: RecognitionSettings, frames: AsyncIterator[UtteranceFrame], trace: TraceIds
    ) -> AsyncIterator[Recognition]:
        # No request_context here: a context variable set across an async generator's yields cannot be
        # reset safely when the generator is closed from another task.
        try:
            async for result in self.stub.recognize(settings, frames):
                yield result
        except RecognitionError as exc:
            raise StageError("asr", exc.code, exc.message) from None

    async def close(self) -> None:
        return None


class LocalQuestionAnswering:
    def __init__(self, server: QAServer) -> None:
        self.server = server

    async def answer(self, request: QARequest, trace: TraceIds) -> QAResult:
        arrival_ns = time.perf_counter_ns()
        options = request.options
        query = QuestionRequest(
            tag=trace.trace_id,
            model_id=request.model_id,
            question=request.question,
            passage=request.passage if request.passage_id is None else None,
            passage_id=request.passage_id,
            n_best_size=options.n_best_size,
            max_answer_length=options.max_answer_length,
            allow_null=options.allow_null,
            null_threshold=options.null_threshold,
        )
        deadline_ns = arrival_ns + int(request.deadline_s * 1e9)
        with request_context(trace.trace_id):
            try:
                async with asyncio.timeout(request.deadline_s):
                    served = await self.server.service.answer(query, arrival_ns, deadline_ns)
            except Exception as exc:
                code, message = status_of(exc)
                raise StageError("qa", code, message) from None
        prediction = served.prediction
        return QAResult(
            prediction.best, prediction.abstained, served.model_id, served.engine, served.timings, served.passage_id
        )

    async def close(self) -> None:
        return None


class LocalResponder:
    def __init__(self, maker: ReplyMaker) -> None:
        self.maker = maker

    @property
    def audio_available(self) -> bool:
        return self.maker.audio_available

    async def respond(self, request: ReplyRequest, trace: TraceIds, timeout_s: float) -> Reply:
        with request_context(trace.trace_id):
            try:
                async with asyncio.timeout(timeout_s):
                    return await self.maker.respond(request)
            except InvalidReplyRequestError as exc:
                raise StageError("response", grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            except TimeoutError:
                raise StageError("response", grpc.StatusCode.DEADLINE_EXCEEDED, "no reply in time") from None

    async def close(self) -> None:
        return None
