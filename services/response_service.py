"""The response stage behind the `response.v1` contract: reply templates, and speech through espeak-ng.

Templates: a confident answer, a hedged one (score below the low-confidence threshold, 0.5 by default: the
score is the QA answer's confidence, calibrated where abstaining is allowed), an abstention, an apology for a
failed turn. Speech, when asked for, comes from Debian's `espeak-ng`
run as a subprocess (never on the event loop's thread, bounded in time); where it is not installed
(or disabled) the reply says AUDIO_UNAVAILABLE and carries no audio. Audio is never faked.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import shutil
import time
from dataclasses import dataclass

import grpc
from realtime_qa.services.logctx import request_context
from realtime_qa.services.stage_server import StageBinding, StageServer, trace_id_of

from realtime_qa.response.v1 import response_pb2, response_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = response_pb2.DESCRIPTOR.services_by_name["Responder"].full_name
MAX_TEXT_CHARS = 4096
# Scores are the QA answer's confidence, a calibrated probability of being right where abstaining is allowed
# (`qacore.confidence`): below 0.5 the answer is more likely wrong than right, so it is hedged.
DEFAULT_LOW_CONFIDENCE = 0.5
MAX_AUDIO_BYTES = 4 * 1024 * 1024  # ~95 s of espeak-ng's 22 kHz speech; longer output is refused


class Outcome(enum.Enum):
    ANSWERED = "answered"
    ABSTAINED = "abstained"
    FAILED = "failed"


class ReplyKind(enum.Enum):
    ANSWER = "answer"
    LOW_CONFIDENCE = "low_confidence"
    ABSTAINED = "abstained"
    ERROR = "error"


class AudioStatus(enum.Enum):
    NOT_REQUESTED = "not_requested"
    SYNTHESIZED = "synthesized"
    UNAVAILABLE = "unavailable"
    FAILED = "failed"


@dataclass(frozen=True)
class ReplyRequest:
    outcome: Outcome
    question: str
    answer: str = ""
    score: float = 0.0  # ANSWERED: the answer's confidence (qa.v1 answer.score), 0..1
    error_message: str = ""
    want_audio: bool = False
    low_confidence_below: float = 0.0  # 0: the responder's default


@dataclass(frozen=True)
class Reply:
    text: str
    kind: ReplyKind
    audio: bytes = b""
    audio_status: AudioStatus = AudioStatus.NOT_REQUESTED
    audio_detail: str = ""
    processing_ns: int = 0


class InvalidReplyRequestError(ValueError):
    """A request the responder cannot make a reply from (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class ResponderConfig:
    speech: bool = True  # use espeak-ng for audio when installed
    espeak_program: str = "espeak-ng"
    voice: str = "en-us"
    words_per_minute: int = 175
    synthesis_timeout_s: float = 10.0
    low_confidence_below: float = DEFAULT_LOW_CONFIDENCE

    def __post_init__(self) -> None:
        if not 80 <= self.words_per_minute <= 500:
            raise ValueError("words per minute must be in [80, 500]")
        if not 0 < self.synthesis_timeout_s <= 600 or not 0 <= self.low_confidence_below <= 1:
            raise ValueError("synthesis timeout must be in (0, 600] s and low confidence in [0, 1]")


TEMPLATES = {
    ReplyKind.ANSWER: "{answer}.",
    ReplyKind.LOW_CONFIDENCE: "I think it is {answer}, but I'm not sure.",
    ReplyKind.ABSTAINED: "I couldn't find that in the passage.",
    ReplyKind.ERROR: "Sorry, I couldn't answer that just now.",
}


class ReplyMaker:
    """The responder's logic, independent of gRPC."""

    def __init__(self, config: ResponderConfig | None = None) -> None:
        self.config = config or ResponderConfig()
        self.espeak = shutil.which(self.config.espeak_program) if self.config.speech else None
        if self.config.speech and self.espeak is None:
            log.warning("%s not installed: replies carry no audio", self.config.espeak_program)

    @property
    def audio_available(self) -> bool:
        return self.espeak is not None

    def template(self, request: ReplyRequest) -> tuple[ReplyKind, str]:
        """The reply text for a validated request."""
        if request.outcome is Outcome.FAILED:
            kind = ReplyKind.ERROR
        elif request.outcome is Outcome.ABSTAINED:
            kind = ReplyKind.ABSTAINED
        else:
            threshold = request.low_confidence_below or self.config.low_confidence_below
            kind = ReplyKind.LOW_CONFIDENCE if request.score < threshold else ReplyKind.ANSWER
        answer = request.answer.strip().rstrip(".")
        text = TEMPLATES[kind].format(answer=answer)
        return kind, text[:1].upper() + text[1:]

    async def respond(self, request: ReplyRequest) -> Reply:
        start = time.perf_counter_ns()
        validate(request)
        kind, text = self.template(request)
        if request.outcome is Outcome.FAILED:
            log.info("apologising for a failed turn: %r", request.error_message)
        audio, status, detail = b"", AudioStatus.NOT_REQUESTED, ""
        if request.want_audio:
            audio, status, detail = await self.synthesize(text)
        return Reply(text, kind, audio, status, detail, time.perf_counter_ns() - start)

    async def synthesize(self, text: str) -> tuple[bytes, AudioStatus, str]:
        """Speak `text` with espeak-ng in a subprocess (text on stdin, WAV on stdout)."""
        if self.espeak is None:
            why = "speech disabled" if not self.config.speech else f"{self.config.espeak_program} not installed"
            return b"", AudioStatus.UNAVAILABLE, f"no audio: {why}"
        process = await asyncio.create_subprocess_exec(
            self.espeak,
            "-v",
            self.config.voice,
            "-s",
            str(self.config.words_per_minute),
            "--stdout",
            "--stdin",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(self.config.synthesis_timeout_s):
                audio, errors = await process.communicate(text.encode("utf-8"))
        except (TimeoutError, asyncio.CancelledError) as exc:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return b"", AudioStatus.FAILED, f"espeak-ng took longer than {self.config.synthesis_timeout_s:g} s"
        if process.returncode != 0 or audio[:4] != b"RIFF":
            detail = errors.decode("utf-8", "replace").strip().splitlines()[:1]
            return b"", AudioStatus.FAILED, f"espeak-ng failed ({process.returncode}): {' '.join(detail)}"
        if len(audio) > MAX_AUDIO_BYTES:
            return b"", AudioStatus.FAILED, f"spoken reply over {MAX_AUDIO_BYTES:,} bytes"
        return audio, AudioStatus.SYNTHESIZED, "espeak-ng"


def validate(request: ReplyRequest) -> None:
    if len(request.question) > MAX_TEXT_CHARS or len(request.answer) > MAX_TEXT_CHARS:
        raise InvalidReplyRequestError(f"question and answer must have at most {MAX_TEXT_CHARS} characters")
    if request.outcome is Outcome.ANSWERED and not request.answer.strip():
        raise InvalidReplyRequestError("an ANSWERED outcome needs the answer text")
    if not (math.isfinite(request.score) and 0 <= request.score <= 1):
        raise InvalidReplyRequestError(f"score must be in [0, 1], got {request.score}")
    if not (math.isfinite(request.low_confidence_below) and 0 <= request.low_confidence_below <= 1):
        raise InvalidReplyRequestError("low_confidence_below must be in [0, 1]")


# -- the response.v1 edge ----------------------------------------------------------------------------

OUTCOME_TO_PB = {
    Outcome.ANSWERED: response_pb2.ANSWERED,
    Outcome.ABSTAINED: response_pb2.ABSTAINED,
    Outcome.FAILED: response_pb2.FAILED,
}
OUTCOME_FROM_PB = {value: key for key, value in OUTCOME_TO_PB.items()}
KIND_TO_PB = {
    ReplyKind.ANSWER: response_pb2.REPLY_ANSWER,
    ReplyKind.LOW_CONFIDENCE: response_pb2.REPLY_LOW_CONFIDENCE,
    ReplyKind.ABSTAINED: response_pb2.REPLY_ABSTAINED,
    ReplyKind.ERROR: response_pb2.REPLY_ERROR,
}
KIND_FROM_PB = {value: key for key, value in KIND_TO_PB.items()}
AUDIO_TO_PB = {
    AudioStatus.NOT_REQUESTED: response_pb2.AUDIO_NOT_REQUESTED,
    AudioStatus.SYNTHESIZED: response_pb2.AUDIO_SYNTHESIZED,
    AudioStatus.UNAVAILABLE: response_pb2.AUDIO_UNAVAILABLE,
    AudioStatus.FAILED: response_pb2.AUDIO_FAILED,
}
AUDIO_FROM_PB = {value: key for key, value in AUDIO_TO_PB.items()}


def request_to_pb(request: ReplyRequest) -> response_pb2.RespondRequest:
    return response_pb2.RespondRequest(
        outcome=OUTCOME_TO_PB[request.outcome],
        question=request.question,
        answer=request.answer,
        score=request.score,
        error_message=request.error_message,
        want_audio=request.want_audio,
        low_confidence_below=request.low_confidence_below,
    )


def request_from_pb(message: response_pb2.RespondRequest) -> ReplyRequest:
    outcome = OUTCOME_FROM_PB.get(message.outcome)
    if outcome is None:
        raise InvalidReplyRequestError("outcome must be ANSWERED, ABSTAINED or FAILED")
    return ReplyRequest(
        outcome,
        message.question,
        message.answer,
        message.score,
        message.error_message,
        message.want_audio,
        message.low_confidence_below,
    )


def reply_to_pb(reply: Reply) -> response_pb2.RespondResponse:
    return response_pb2.RespondResponse(
        text=reply.text,
        kind=KIND_TO_PB[reply.kind],
        audio=reply.audio,
        audio_status=AUDIO_TO_PB[reply.audio_status],
        audio_detail=reply.audio_detail,
        processing_ns=reply.processing_ns,
    )


def reply_from_pb(message: response_pb2.RespondResponse) -> Reply:
    return Reply(
        message.text,
        KIND_FROM_PB.get(message.kind, ReplyKind.ERROR),
        message.audio,
        AUDIO_FROM_PB.get(message.audio_status, AudioStatus.FAILED),
        message.audio_detail,
        message.processing_ns,
    )


class ResponderService(response_pb2_grpc.ResponderServicer):
    """response.v1.Responder over a ReplyMaker."""

    def __init__(self, maker: ReplyMaker) -> None:
        self.maker = maker

    async def Respond(  # noqa: N802 - gRPC method name
        self, request: response_pb2.RespondRequest, context: grpc.aio.ServicerContext
    ) -> response_pb2.RespondResponse:
        with request_context(trace_id_of(context)):
            try:
                reply = await self.maker.respond(request_from_pb(request))
            except InvalidReplyRequestError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Exception as exc:
                log.error("reply failed unexpectedly", exc_info=exc)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")
            return reply_to_pb(reply)


def response_binding(maker: ReplyMaker) -> StageBinding:
    service = ResponderService(maker)
    return StageBinding(SERVICE_NAME, lambda server: response_pb2_grpc.add_ResponderServicer_to_server(service, server))


def response_server(
    maker: ReplyMaker,
    host: str = "127.0.0.1",
    port: int = 0,
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
) -> StageServer:
    """The response stage as its own gRPC server (with health checking)."""
    return StageServer("response", [response_binding(maker)], host, port, interceptors)
