"""The chain's front: the `assistant.v1.Assistant` servicer (protobuf at this edge, the chain inside).

Every turn's report goes to the board (`record(report)`, e.g. `pipeline.board.LatencyBoard`) before
it is sent to the client, so the dashboard and Prometheus see every turn, failed ones included.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc
from realtime_qa.pipeline.chain import (
    AnswerEvent,
    Chain,
    ChainEvent,
    InvalidInputError,
    ReplyEvent,
    ReportEvent,
    SessionSettings,
    SessionStarted,
    TranscriptEvent,
    TurnErrorEvent,
    UserAudio,
    UserEndOfUtterance,
    UserInput,
    UserText,
)
from realtime_qa.pipeline.client import AnswerOptions
from realtime_qa.qacore.latency import MS, Budgets, TurnReport
from realtime_qa.services.asr_stub import AudioEncoding
from realtime_qa.services.interceptors import InvalidMessage
from realtime_qa.services.logctx import escape_log_text, request_context
from realtime_qa.services.response_service import AUDIO_TO_PB, KIND_TO_PB
from realtime_qa.services.stage_server import MAX_TRACE_ID_CHARS, TRACE_ID_HEADER, StageBinding, StageServer

from realtime_qa.assistant.v1 import assistant_pb2, assistant_pb2_grpc
from realtime_qa.qa.v1 import qa_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = assistant_pb2.DESCRIPTOR.services_by_name["Assistant"].full_name
MAX_PASSAGE_CHARS = 1_000_000
MAX_BUDGET_MS = 3_600_000.0


class ReportSink(Protocol):
    """Where every turn's report goes (the dashboard's LatencyBoard has this method)."""

    def record(self, report: TurnReport) -> None: ...


# -- protobuf -> domain ------------------------------------------------------------------------------


def session_from_pb(config: assistant_pb2.SessionConfig, defaults: Budgets) -> SessionSettings:
    source = config.WhichOneof("passage_source")
    if source is None:
        raise InvalidInputError("the session has neither passage nor passage_id")
    if source == "passage" and len(config.passage) > MAX_PASSAGE_CHARS:
        raise InvalidInputError(f"the passage has {len(config.passage):,} characters; the limit is 1,000,000")
    overrides: dict[str, int] = {}
    for name, value in config.budgets_ms.items():
        if not (math.isfinite(value) and 0 < value <= MAX_BUDGET_MS):
            raise InvalidInputError(f"budget of {name!r} must be in (0, {MAX_BUDGET_MS:.0f}] ms, got {value}")
        overrides[name] = max(1, round(value * MS))
    try:
        budgets = defaults.with_overrides(overrides)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    return SessionSettings(
        passage=config.passage if source == "passage" else None,
        passage_id=config.passage_id if source == "passage_id" else None,
        model_id=config.model_id,
        qa_options=options_from_pb(config.qa_options) if config.HasField("qa_options") else AnswerOptions(),
        budgets=budgets,
        want_audio=config.want_audio,
        audio_encoding=AudioEncoding.PCM16 if config.audio_format == assistant_pb2.PCM16 else AudioEncoding.WAV,
        interim_results=config.interim_results,
        low_confidence_below=config.low_confidence_below,
    )


def options_from_pb(options: qa_pb2.AnswerOptions) -> AnswerOptions:
    n_best = options.n_best_size if options.HasField("n_best_size") else None
    max_length = options.max_answer_length if options.HasField("max_answer_length") else None
    threshold = options.null_threshold if options.HasField("null_threshold") else None
    if n_best is not None and not 1 <= n_best <= 100:
        raise InvalidInputError(f"qa_options.n_best_size must be in [1, 100], got {n_best}")
    if max_length is not None and not 1 <= max_length <= 512:
        raise InvalidInputError(f"qa_options.max_answer_length must be in [1, 512], got {max_length}")
    if threshold is not None and not math.isfinite(threshold):
        raise InvalidInputError("qa_options.null_threshold must be finite")
    return AnswerOptions(n_best, max_length, options.allow_null, threshold)


async def inputs_from_pb(request_iterator: Any) -> AsyncIterator[UserInput]:
    async for message in request_iterator:
        if isinstance(message, InvalidMessage):  # could not be read (services.interceptors.MessageInterceptor)
            raise InvalidInputError(message.message)
        kind = message.WhichOneof("request")
        if kind == "text":
            yield UserText(message.text.text)
        elif kind == "audio":
            yield UserAudio(message.audio.content, message.audio.stub_transcript)
        elif kind == "end_of_utterance":
            yield UserEndOfUtterance(message.end_of_utterance.stub_transcript)
        else:
            raise InvalidInputError("a second SessionConfig (or an empty message) in the middle of a session")


# -- domain -> protobuf ------------------------------------------------------------------------------


def report_to_pb(report: TurnReport) -> assistant_pb2.LatencyReport:
    return assistant_pb2.LatencyReport(
        stages=[
            assistant_pb2.StageLatency(
                name=span.name,
                start_ns=span.start_ns,
                duration_ns=span.duration_ns,
                budget_ns=span.budget_ns or 0,
                over_budget=span.over_budget,
            )
            for span in report.spans
        ],
        total_ns=report.total_ns,
        turn_budget_ns=report.turn_budget_ns,
        over_budget=report.over_budget,
        unattributed_ns=report.unattributed_ns,
        error=report.error or "",
    )


def event_to_pb(event: ChainEvent) -> assistant_pb2.ConverseEvent:
    if isinstance(event, SessionStarted):
        started = assistant_pb2.SessionStarted(
            trace_id=event.trace_id, budgets_ms=event.budgets.as_ms(), audio_available=event.audio_available
        )
        return assistant_pb2.ConverseEvent(turn=0, trace_id=event.trace_id, started=started)
    message = assistant_pb2.ConverseEvent(turn=event.turn, trace_id=event.trace_id)
    if isinstance(event, TranscriptEvent):
        message.transcript.CopyFrom(
            assistant_pb2.Transcript(
                text=event.text, is_final=event.is_final, stability=event.stability, confidence=event.confidence
            )
        )
    elif isinstance(event, AnswerEvent):
        result, best = event.result, event.result.best
        message.answer.CopyFrom(
            assistant_pb2.Answer(
                text=best.text if best else "",
                start=best.start if best else 0,
                end=best.end if best else 0,
                score=best.score if best else 0.0,
                abstained=result.abstained or best is None,
                model_id=result.model_id,
                engine=result.engine,
            )
        )
    elif isinstance(event, ReplyEvent):
        reply = event.reply
        message.reply.CopyFrom(
            assistant_pb2.Reply(
                text=reply.text,
                kind=KIND_TO_PB[reply.kind],
                audio=reply.audio,
                audio_status=AUDIO_TO_PB[reply.audio_status],
                audio_detail=reply.audio_detail,
            )
        )
    elif isinstance(event, TurnErrorEvent):
        message.error.CopyFrom(
            assistant_pb2.TurnError(stage=event.stage, code=event.code.value[0], message=event.message)
        )
    else:
        message.report.CopyFrom(report_to_pb(event.report))
    return message


# -- the servicer ------------------------------------------------------------------------------------


class AssistantService(assistant_pb2_grpc.AssistantServicer):
    def __init__(
        self, chain: Chain, board: ReportSink, default_budgets: Budgets | None = None, max_sessions: int = 256
    ) -> None:
        self.chain = chain
        self.board = board
        self.default_budgets = default_budgets or Budgets()
        self.max_sessions = max_sessions
        self.sessions = 0

    async def Converse(  # noqa: N802 - gRPC method name
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[assistant_pb2.ConverseEvent]:
        trace_id = session_trace_id(context)
        with request_context(trace_id):
            context.set_trailing_metadata(((TRACE_ID_HEADER, trace_id),))
            if self.sessions >= self.max_sessions:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.max_sessions} sessions already open")
            self.sessions += 1
            try:
                first = await anext(aiter(request_iterator), None)
                if first is None:
                    return
                if isinstance(first, InvalidMessage):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, first.message)
                if first.WhichOneof("request") != "config":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a SessionConfig")
                try:
                    session = session_from_pb(first.config, self.default_budgets)
                except InvalidInputError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                log.info("session opened")
                try:
                    async for event in self.chain.converse(session, trace_id, inputs_from_pb(request_iterator)):
                        if isinstance(event, ReportEvent):
                            self.board.record(event.report)
                        yield event_to_pb(event)
                except InvalidInputError as exc:
                    log.info("session ended by a bad message: %s", exc)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                log.info("session closed")
            finally:
                self.sessions -= 1


def session_trace_id(context: grpc.aio.ServicerContext) -> str:
    """The client's x-trace-id (bounded, escaped) or a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == TRACE_ID_HEADER and isinstance(value, str) and value.strip():
            return escape_log_text(value.strip()[:MAX_TRACE_ID_CHARS]).replace("/", "_")
    return uuid.uuid4().hex[:16]


def assistant_binding(service: AssistantService) -> StageBinding:
    return StageBinding(
        SERVICE_NAME, lambda server: assistant_pb2_grpc.add_AssistantServicer_to_server(service, server)
    )


def assistant_server(
    service: AssistantService,
    host: str = "127.0.0.1",
    port: int = 0,
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
) -> StageServer:
    """The front as a gRPC server (with health checking)."""
    return StageServer("assistant front", [assistant_binding(service)], host, port, interceptors)
