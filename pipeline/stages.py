"""The chain's three stages, each behind one small async interface.

Every stage has two adapters with the same interface: in-process (pipeline/local_stages.py: the
stage's logic called on this event loop) and gRPC (pipeline/grpc_stages.py: the stage's server on
another port or host). The chain (pipeline/chain.py) only sees these interfaces, so the one-process
chain and the `--split` chain run the same code.

Every call carries the turn's `TraceIds`; a stage failure is a `StageError` with the gRPC status code
the stage reported (or would have reported), whichever adapter ran it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from realtime_qa.pipeline.client import AnswerOptions
from realtime_qa.qacore.decoding import Span
from realtime_qa.qacore.latency import StageTimings
from realtime_qa.services.asr_stub import Recognition, RecognitionSettings, UtteranceFrame
from realtime_qa.services.logctx import REQUEST_ID_HEADER
from realtime_qa.services.response_service import Reply, ReplyRequest
from realtime_qa.services.stage_server import TRACE_ID_HEADER


class StageError(Exception):
    """A stage failed or ran out of time; the turn reports it and the session goes on."""

    def __init__(self, stage: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{stage}: {code.name}: {message}")
        self.stage = stage
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TraceIds:
    """Who a stage call belongs to: the turn's trace id (also sent as the call's request id)."""

    trace_id: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TRACE_ID_HEADER, self.trace_id), (REQUEST_ID_HEADER, self.trace_id))


@dataclass(frozen=True)
class QARequest:
    """One question of a turn: about the session's passage (text or id), within `deadline_s`."""

    question: str
    passage: str | None
    passage_id: str | None
    deadline_s: float
    model_id: str = ""
    options: AnswerOptions = field(default_factory=AnswerOptions)


@dataclass(frozen=True)
class QAResult:
    best: Span | None  # None when abstained; its score is the answer's confidence (qa.v1 answer.score)
    abstained: bool
    model_id: str
    engine: str
    timings: StageTimings  # the QA server's own timings (qa.v1 StageTimings)
    passage_id: str = ""  # the id under which the QA server holds the passage: send it instead of the text


class SpeechRecognizer(Protocol):
    """asr: frames of one utterance in, interim results and one final result out."""

    def recognize(
        self, settings: RecognitionSettings, frames: AsyncIterator[UtteranceFrame], trace: TraceIds
    ) -> AsyncIterator[Recognition]: ...

    async def close(self) -> None: ...


class QuestionAnswering(Protocol):
    """qa: a question about a passage in, an answer (with the server's timings) out."""

    async def answer(self, request: QARequest, trace: TraceIds) -> QAResult: ...

    async def close(self) -> None: ...


class ReplyStage(Protocol):
    """response: an answer in, the reply (and its audio) out."""

    async def respond(self, request: ReplyRequest, trace: TraceIds, timeout_s: float) -> Reply: ...

    @property
    def audio_available(self) -> bool: ...

    async def close(self) -> None: ...


@dataclass
class Stages:
    """The three stages a chain calls."""

    asr: SpeechRecognizer
    qa: QuestionAnswering
    response: ReplyStage

    async def close(self) -> None:
        for stage in (self.asr, self.qa, self.response):
            await stage.close()
