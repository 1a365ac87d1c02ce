"""The conversational chain: user turns in, transcripts, answers, replies and latency reports out.

One session is a stream composed with aiostream operators:

    user inputs ──feeder task──▶ utterances (bounded queue)
        | map(recognize, ordered, task_limit=max_turns_ahead)   ASR of up to N turns at once; interim
        |                                                        transcripts go out at once (side queue)
        | concatmap(answer_turn, task_limit=1)                   per turn, in order: final transcript,
        |                                                        QA (deadline = QA budget), response,
        |                                                        one TurnReport
        merge(interim transcripts, turn events)  ──▶ events

So a final transcript flows to QA at once, and the reply of turn N streams back while turn N+1 is
being heard. Every queue is bounded (utterances waiting, audio chunks per utterance, interim
events), so a slow stage or a slow reader slows the session down to the client's stream (gRPC flow
control) and memory stays bounded. A stage that fails or times out becomes a TurnError event for
that turn, followed by its report; the session goes on.

Latency: a turn starts at the end of the user's utterance (the moment the chain reads the text turn,
or the EndOfUtterance of a spoken one). Each stage is recorded with `TurnRecorder.record_remote`: its
round trip from the chain's side, the stage server's own time inside it, and the gap between them
(`<stage>.network`). Waiting behind the previous turn is time the user waits too: it stays in the
report as unattributed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from aiostream import pipe, stream
from aiostream.core import Stream

from pipeline.client import AnswerOptions
from pipeline.stages import QARequest, QAResult, StageError, Stages, TraceIds
from qacore.latency import MS, STAGES, Budgets, TurnRecorder, TurnReport
from services.asr_stub import (
    AudioEncoding,
    AudioFrame,
    EndFrame,
    Recognition,
    RecognitionSettings,
    TextFrame,
    UtteranceFrame,
)
from services.response_service import Outcome, Reply, ReplyRequest

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 4096
MAX_CHUNK_BYTES = 1024 * 1024


class InvalidInputError(ValueError):
    """The client broke the session's protocol; the session ends with INVALID_ARGUMENT."""


# -- what the client sends ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionSettings:
    """A session's options, validated."""

    passage: str | None = None
    passage_id: str | None = None
    model_id: str = ""
    qa_options: AnswerOptions = field(default_factory=AnswerOptions)
    budgets: Budgets = field(default_factory=Budgets)
    want_audio: bool = False
    audio_encoding: AudioEncoding = AudioEncoding.WAV
    interim_results: bool = False
    low_confidence_below: float = 0.0  # 0: the response stage's default

    def __post_init__(self) -> None:
        if (self.passage is None) == (self.passage_id is None):
            raise InvalidInputError("give exactly one of passage and passage_id")
        if self.passage is not None and not self.passage.strip():
            raise InvalidInputError("the passage is empty")
        if self.passage_id is not None and not self.passage_id.strip():
            raise InvalidInputError("the passage_id is empty")
        if not 0 <= self.low_confidence_below <= 1:
            raise InvalidInputError("low_confidence_below must be in [0, 1]")


@dataclass(frozen=True)
class UserText:
    text: str


@dataclass(frozen=True)
class UserAudio:
    content: bytes
    stub_transcript: str = ""


@dataclass(frozen=True)
class UserEndOfUtterance:
    stub_transcript: str = ""


UserInput = UserText | UserAudio | UserEndOfUtterance


# -- what the chain sends back -----------------------------------------------------------------------


@dataclass(frozen=True)
class SessionStarted:
    trace_id: str
    budgets: Budgets
    audio_available: bool
    turn: int = 0


@dataclass(frozen=True)
class TranscriptEvent:
    turn: int
    trace_id: str
    text: str
    is_final: bool
    stability: float = 0.0
    confidence: float = 0.0


@dataclass(frozen=True)
class AnswerEvent:
    turn: int
    trace_id: str
    result: QAResult


@dataclass(frozen=True)
class ReplyEvent:
    turn: int
    trace_id: str
    reply: Reply


@dataclass(frozen=True)
class TurnErrorEvent:
    turn: int
    trace_id: str
    stage: str
    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class ReportEvent:
    turn: int
    trace_id: str
    report: TurnReport


ChainEvent = SessionStarted | TranscriptEvent | AnswerEvent | ReplyEvent | TurnErrorEvent | ReportEvent


@dataclass(frozen=True)
class ChainSettings:
    """How the chain runs sessions (server side)."""

    asr_timeout_s: float = 5.0  # end of utterance to final transcript, at most
    response_timeout_s: float = 10.0  # a reply (with speech synthesis), at most
    max_turns_ahead: int = 4  # utterances recognized or waiting while earlier turns are answered
    max_queued_chunks: int = 32  # audio chunks buffered per utterance before the client is slowed down
    max_queued_events: int = 64  # interim transcripts buffered before recognition is slowed down

    def __post_init__(self) -> None:
        if not (0 < self.asr_timeout_s <= 600 and 0 < self.response_timeout_s <= 600):
            raise ValueError("stage timeouts must be in (0, 600] s")
        if min(self.max_turns_ahead, self.max_queued_chunks, self.max_queued_events) < 2:
            raise ValueError("queue bounds must be >= 2")


# -- one session -------------------------------------------------------------------------------------

_END = object()  # end of a queue's items


class Utterance:
    """One user turn as it arrives: its frames go to the recognizer through a bounded queue."""

    def __init__(self, turn: int, trace: TraceIds, settings: RecognitionSettings, max_chunks: int) -> None:
        self.turn = turn
        self.trace = trace
        self.settings = settings
        self.end_ns: int | None = None  # perf_counter_ns at the end of the utterance: the turn's start
        self.ended = asyncio.Event()
        self._frames: asyncio.Queue[UtteranceFrame | object] = asyncio.Queue(max_chunks)
        self._abandoned = False
        self._on_end: Callable[[], None] | None = None

    async def put(self, frame: UtteranceFrame) -> None:
        """Queue a frame (waits while the recognizer is behind: backpressure); dropped once abandoned."""
        if not self._abandoned:
            await self._frames.put(frame)

    async def end(self, frame: UtteranceFrame | None = None) -> None:
        self.end_ns = time.perf_counter_ns()
        self.ended.set()
        if self._on_end is not None:
            self._on_end()
        if frame is not None:
            await self.put(frame)
        if not self._abandoned:
            await self._frames.put(_END)

    def on_end(self, callback: Callable[[], None]) -> None:
        self._on_end = callback
        if self.ended.is_set():
            callback()

    def abandon(self) -> None:
        """The recognizer stopped reading: drop queued and later frames so the feeder never blocks."""
        self._abandoned = True
        while not self._frames.empty():
            self._frames.get_nowait()

    async def frames(self) -> AsyncIterator[UtteranceFrame]:
        while (frame := await self._frames.get()) is not _END:
            yield cast(UtteranceFrame, frame)


@dataclass(frozen=True)
class Recognized:
    utterance: Utterance
    final: Recognition | None
    done_ns: int  # when the final transcript (or the failure) reached the chain
    error: StageError | None = None


class Conversation:
    """The state of one session: its settings, trace id, stages and the interim-transcript side queue."""

    def __init__(self, stages: Stages, chain: ChainSettings, session: SessionSettings, trace_id: str) -> None:
        self.stages = stages
        self.chain = chain
        self.session = session
        self.trace_id = trace_id
        self._interim: asyncio.Queue[TranscriptEvent | object] = asyncio.Queue(chain.max_queued_events)

    def events(self, inputs: AsyncIterator[UserInput]) -> AsyncIterator[ChainEvent]:
        # aiostream's operator signatures are looser than mypy can follow: the stages are typed here.
        recognize: Any = self._recognize
        answer_turn: Any = self._answer_turn
        recognized: Stream[Recognized] = stream.iterate(self._utterances(inputs)) | pipe.map(
            recognize, ordered=True, task_limit=self.chain.max_turns_ahead
        )
        answered: Stream[ChainEvent] = recognized | pipe.concatmap(answer_turn, task_limit=1)
        merged: Stream[ChainEvent] = stream.merge(self._interim_events(), self._then_close_interim(answered))
        return self._iterate(merged)

    @staticmethod
    async def _iterate(source: Stream[ChainEvent]) -> AsyncIterator[ChainEvent]:
        async with source.stream() as events:
            async for event in events:
                yield event

    # -- feeding ---------------------------------------------------------------------------------

    async def _utterances(self, inputs: AsyncIterator[UserInput]) -> AsyncIterator[Utterance]:
        """Utterances as they start; a separate task reads the client so audio keeps flowing."""
        queue: asyncio.Queue[Utterance | object] = asyncio.Queue(self.chain.max_turns_ahead)
        feeder = asyncio.create_task(self._feed(inputs, queue))
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, Utterance)
                yield item
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder

    async def _feed(self, inputs: AsyncIterator[UserInput], queue: asyncio.Queue[Utterance | object]) -> None:
        turn = 0
        current: Utterance | None = None

        def start(stub_transcript: str) -> Utterance:
            nonlocal turn
            turn += 1
            settings = RecognitionSettings(
                self.session.audio_encoding, self.session.interim_results, stub_transcript.strip()
            )
            trace = TraceIds(f"{self.trace_id}/{turn}")
            return Utterance(turn, trace, settings, self.chain.max_queued_chunks)

        try:
            async for item in inputs:
                if isinstance(item, UserText):
                    if current is not None:
                        raise InvalidInputError("a text turn inside a spoken turn (send EndOfUtterance first)")
                    if not item.text.strip() or len(item.text) > MAX_TEXT_CHARS:
                        raise InvalidInputError(f"a text turn must have 1..{MAX_TEXT_CHARS} characters")
                    utterance = start("")
                    await queue.put(utterance)
                    await utterance.end(TextFrame(item.text))
                elif isinstance(item, UserAudio):
                    if len(item.content) > MAX_CHUNK_BYTES:
                        raise InvalidInputError(f"an audio chunk of {len(item.content):,} bytes (limit 1 MiB)")
                    if current is None:
                        current = start(item.stub_transcript)
                        await queue.put(current)
                    await current.put(AudioFrame(item.content))
                else:
                    if current is None:
                        raise InvalidInputError("EndOfUtterance without a spoken turn")
                    await current.end(EndFrame(item.stub_transcript.strip()))
                    current = None
            if current is not None:  # the client half-closed in mid-utterance: that ends it
                await current.end()
            await queue.put(_END)
        except InvalidInputError as exc:
            await queue.put(exc)

    # -- recognition (several turns at once) -----------------------------------------------------

    async def _recognize(self, utterance: Utterance) -> Recognized:
        loop = asyncio.get_running_loop()
        final: Recognition | None = None
        error: StageError | None = None
        try:
            async with asyncio.timeout(None) as scope:
                timeout_s = self.chain.asr_timeout_s
                utterance.on_end(lambda: scope.reschedule(loop.time() + timeout_s))
                async for result in self.stages.asr.recognize(utterance.settings, utterance.frames(), utterance.trace):
                    if result.is_final:
                        final = result
                        break
                    event = TranscriptEvent(
                        utterance.turn, utterance.trace.trace_id, result.transcript, False, result.stability
                    )
                    await self._interim.put(event)
        except TimeoutError:
            message = f"no final transcript within {self.chain.asr_timeout_s:g} s of the end of the utterance"
            error = StageError("asr", grpc.StatusCode.DEADLINE_EXCEEDED, message)
        except StageError as exc:
            error = exc
        done_ns = time.perf_counter_ns()
        if final is None and error is None:
            error = StageError("asr", grpc.StatusCode.INTERNAL, "the recognizer ended without a final transcript")
        if error is not None:
            utterance.abandon()
            await utterance.ended.wait()  # the turn starts (and is reported) when the user stops speaking
            done_ns = max(done_ns, time.perf_counter_ns())
        return Recognized(utterance, final, done_ns, error)

    async def _interim_events(self) -> AsyncIterator[ChainEvent]:
        while (event := await self._interim.get()) is not _END:
            assert isinstance(event, TranscriptEvent)
            yield event

    async def _then_close_interim(self, source: Stream[ChainEvent]) -> AsyncIterator[ChainEvent]:
        async with source.stream() as events:
            async for event in events:
                yield event
        await self._interim.put(_END)

    # -- answering (one turn at a time, in order) ------------------------------------------------

    async def _answer_turn(self, recognized: Recognized) -> AsyncIterator[ChainEvent]:
        utterance = recognized.utterance
        turn, trace = utterance.turn, utterance.trace
        budgets = self.session.budgets
        assert utterance.end_ns is not None
        recorder = TurnRecorder(turn, trace.trace_id, budgets, start_ns=utterance.end_ns)
        if recognized.error is not None or recognized.final is None:
            error = recognized.error or StageError("asr", grpc.StatusCode.INTERNAL, "no transcript")
            recorder.record("asr", utterance.end_ns, recognized.done_ns)
            yield TurnErrorEvent(turn, trace.trace_id, "asr", error.code, error.message)
            yield ReportEvent(turn, trace.trace_id, recorder.finish(error=str(error)))
            return
        final = recognized.final
        recorder.record_remote("asr", utterance.end_ns, recognized.done_ns, {}, final.processing_ns)
        yield TranscriptEvent(turn, trace.trace_id, final.transcript, True, confidence=final.confidence)

        errors: list[str] = []
        qa_budget_ns = budgets.of("qa") or 10 * MS
        request = QARequest(
            question=final.transcript,
            passage=self.session.passage,
            passage_id=self.session.passage_id,
            deadline_s=qa_budget_ns / 1e9,
            model_id=self.session.model_id,
            options=self.session.qa_options,
        )
        begin = time.perf_counter_ns()
        try:
            result = await self.stages.qa.answer(request, trace)
        except StageError as exc:
            recorder.record("qa", begin, time.perf_counter_ns())
            errors.append(str(exc))
            reply_request = ReplyRequest(Outcome.FAILED, final.transcript, error_message=str(exc))
            yield TurnErrorEvent(turn, trace.trace_id, "qa", exc.code, exc.message)
        else:
            timings = result.timings
            server_stages = {name: timings.stage_ns(name) for name in STAGES}
            recorder.record_remote("qa", begin, time.perf_counter_ns(), server_stages, timings.total_ns)
            yield AnswerEvent(turn, trace.trace_id, result)
            reply_request = self._reply_request(final.transcript, result)

        begin = time.perf_counter_ns()
        try:
            reply = await self.stages.response.respond(reply_request, trace, self.chain.response_timeout_s)
        except StageError as exc:
            recorder.record("response", begin, time.perf_counter_ns())
            errors.append(str(exc))
            yield TurnErrorEvent(turn, trace.trace_id, "response", exc.code, exc.message)
        else:
            recorder.record_remote("response", begin, time.perf_counter_ns(), {}, reply.processing_ns)
            yield ReplyEvent(turn, trace.trace_id, reply)
        report = recorder.finish(error="; ".join(errors) or None)
        yield ReportEvent(turn, trace.trace_id, report)

    def _reply_request(self, question: str, result: QAResult) -> ReplyRequest:
        want_audio = self.session.want_audio
        if result.abstained or result.best is None:
            return ReplyRequest(Outcome.ABSTAINED, question, want_audio=want_audio)
        return ReplyRequest(
            Outcome.ANSWERED,
            question,
            result.best.text,
            min(1.0, max(0.0, result.best.score)),
            want_audio=want_audio,
            low_confidence_below=self.session.low_confidence_below,
        )


class Chain:
    """Runs sessions over one set of stages (in-process or gRPC adapters: the same code)."""

    def __init__(self, stages: Stages, settings: ChainSettings | None = None) -> None:
        self.stages = stages
        self.settings = settings or ChainSettings()

    async def converse(
        self, session: SessionSettings, trace_id: str, inputs: AsyncIterator[UserInput]
    ) -> AsyncIterator[ChainEvent]:
        """The session's events: SessionStarted, then each turn's events as they happen.

        Raises InvalidInputError when the client breaks the protocol (the session ends).
        """
        yield SessionStarted(trace_id, session.budgets, self.stages.response.audio_available)
        conversation = Conversation(self.stages, self.settings, session, trace_id)
        async for event in conversation.events(inputs):
            yield event

    async def close(self) -> None:
        await self.stages.close()
