"""gRPC adapters of the stage interfaces: each stage's server reached over the network.

Each call carries the turn's trace id in `x-trace-id` and `x-request-id` metadata (the QA call too,
through `QAClient`). Every gRPC failure becomes a `StageError` with the call's status code.

Security: given a `ClientConfig` with TLS settings and/or a bearer token (`qa-pipeline --split` with
`--tls-*`/`--auth-token-file` passes the front's settings on to its stage processes), every adapter
dials its stage over TLS (mutual TLS with a client certificate) and presents the token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
from realtime_qa.pipeline.client import ClientConfig, QAClient, QAClientError, RetryPolicy, open_channel, status_code_of
from realtime_qa.pipeline.stages import QARequest, QAResult, StageError, TraceIds
from realtime_qa.services.asr_stub import Recognition, RecognitionSettings, UtteranceFrame, frame_to_pb, settings_to_pb
from realtime_qa.services.response_service import Reply, ReplyRequest, reply_from_pb, request_to_pb
from realtime_qa.services.stage_server import MAX_MESSAGE_BYTES, TRACE_ID_HEADER

from realtime_qa.asr.v1 import asr_pb2, asr_pb2_grpc
from realtime_qa.response.v1 import response_pb2_grpc

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


def _channel(target: str, security: ClientConfig | None) -> tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]]:
    """A channel to a stage server (TLS and token from `security`) and the metadata each call adds."""
    return open_channel(target, security or ClientConfig(), CHANNEL_OPTIONS)


def _stage_error(stage: str, exc: grpc.aio.AioRpcError) -> StageError:
    return StageError(stage, exc.code(), exc.details() or "")


class GrpcRecognizer:
    """asr.v1.Recognizer: one StreamingRecognize call per utterance."""

    def __init__(self, target: str, security: ClientConfig | None = None) -> None:
        self.target = target
        self.channel, self._auth = _channel(target, security)
        self._stub = asr_pb2_grpc.RecognizerStub(self.channel)

    async def recognize(
        self, settings: RecognitionSettings, frames: AsyncIterator[UtteranceFrame], trace: TraceIds
    ) -> AsyncIterator[Recognition]:
        async def requests() -> AsyncIterator[asr_pb2.StreamingRecognizeRequest]:
            yield asr_pb2.StreamingRecognizeRequest(config=settings_to_pb(settings))
            async for frame in frames:
                yield frame_to_pb(frame)

        call = self._stub.StreamingRecognize(requests(), metadata=(*trace.metadata, *self._auth))
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
    """qa.v1.QuestionAnswering through `QAClient` (its retries of UNAVAILABLE stay inside the deadline).

    `config` (TLS, token) gets a retry policy of 2 attempts: a retry must fit in the QA budget; `connections` of
    its own, each question on the least busy (`ClientConfig.connections`).
    """

    def __init__(self, target: str, config: ClientConfig | None = None, connections: int = 1) -> None:
        self.client = QAClient(
            target, replace(config or ClientConfig(), retry=RetryPolicy(max_attempts=2), connections=connections)
        )

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
                metadata=((TRACE_ID_HEADER, trace.trace_id),),
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

    def __init__(self, target: str, audio_available: bool = False, security: ClientConfig | None = None) -> None:
        self.target = target
        self.channel, self._auth = _channel(target, security)
        self._stub = response_pb2_grpc.ResponderStub(self.channel)
        self._audio_available = audio_available

    @property
    def audio_available(self) -> bool:
        return self._audio_available

    async def respond(self, request: ReplyRequest, trace: TraceIds, timeout_s: float) -> Reply:
        try:
            metadata = (*trace.metadata, *self._auth)
            message = await self._stub.Respond(request_to_pb(request), timeout=timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise _stage_error("response", exc) from None
        return reply_from_pb(message)

    async def close(self) -> None:
        await self.channel.close()
