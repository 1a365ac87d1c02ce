"""gRPC adapters of the stage interfaces: each stage's server reached over the network.

Each call carries the turn's trace id in `x-trace-id` and `x-request-id` metadata (the QA call's
`x-request-id`, through `QAClient`, is the trace id too). Every gRPC failure becomes a `StageError`
with the call's status code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from asr.v1 import asr_pb2, asr_pb2_grpc
from pipeline.client import ClientConfig, QAClient, QAClientError, RetryPolicy, status_code_of
from pipeline.stages import QARequest, QAResult, StageError, TraceIds
from response.v1 import response_pb2_grpc
from services.asr_stub import Recognition, RecognitionSettings, UtteranceFrame, frame_to_pb, settings_to_pb
from services.response_service import Reply, ReplyRequest, reply_from_pb, request_to_pb
from services.stage_server import MAX_MESSAGE_BYTES

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


def _stage_error(stage: str, exc: grpc.aio.AioRpcError) -> StageError:
    return StageError(stage, exc.code(), exc.details() or "")


class GrpcRecognizer:
    """asr.v1.Recognizer: one StreamingRecognize call per utterance."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = asr_pb2_grpc.RecognizerStub(self.channel)

    async def recognize(
        self, settings: RecognitionSettings, frames: AsyncIterator[UtteranceFrame], trace: TraceIds
    ) -> AsyncIterator[Recognition]:
        async def requests() -> AsyncIterator[asr_pb2.StreamingRecognizeRequest]:
            yield asr_pb2.StreamingRecognizeRequest(config=settings_to_pb(settings))
            async for frame in frames:
                yield frame_to_pb(frame)

        call = self._stub.StreamingRecognize(requests(), metadata=trace.metadata)
        try:
            async for message in call:
                if message.HasField("error"):
                    raise StageError("asr", status_code_of(message.error.code), message.error.message)
                yield Recognition(
                    message.transcript,
                    message.is_final,
                    message.stability,
                    message.confidence,
                    message.audio_seconds,
                    message.processing_ns,
                )
        except grpc.aio.AioRpcError as exc:
            raise _stage_error("asr", exc) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close()


class GrpcQuestionAnswering:
    """qa.v1.QuestionAnswering through `QAClient` (its retries of UNAVAILABLE stay inside the deadline)."""

    def __init__(self, target: str, config: ClientConfig | None = None) -> None:
        self.client = QAClient(target, config or ClientConfig(retry=RetryPolicy(max_attempts=2)))

    async def answer(self, request: QARequest, trace: TraceIds) -> QAResult:
        try:
            answer = await self.client.answer(
                request.question,
                request.passage if request.passage_id is None else None,
                passage_id=request.passage_id,
                model_id=request.model_id,
                options=request.options,
                timeout_s=request.deadline_s,
                request_id=trace.trace_id,
            )
        except QAClientError as exc:
            raise StageError("qa", exc.code, exc.message) from None
        return QAResult(
            answer.best, answer.abstained, answer.model_id, answer.engine, answer.timings, answer.passage_id
        )

    async def close(self) -> None:
        await self.client.close()


class GrpcResponder:
    """response.v1.Responder."""

    def __init__(self, target: str, audio_available: bool = False) -> None:
        self.target = target
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = response_pb2_grpc.ResponderStub(self.channel)
        self._audio_available = audio_available

    @property
    def audio_available(self) -> bool:
        return self._audio_available

    async def respond(self, request: ReplyRequest, trace: TraceIds, timeout_s: float) -> Reply:
        try:
            message = await self._stub.Respond(request_to_pb(request), timeout=timeout_s, metadata=trace.metadata)
        except grpc.aio.AioRpcError as exc:
            raise _stage_error("response", exc) from None
        return reply_from_pb(message)

    async def close(self) -> None:
        await self.channel.close()
