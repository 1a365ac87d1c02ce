"""The conversational chain: user turns in, transcripts, answers, replies and latency reports out.

One session, composed with aiostream operators:

    user inputs ──feeder task──▶ turns, each started as its own task as soon as its utterance starts:
        asr (audio streams to the recognizer as it arrives) → qa (deadline = QA budget) → response
        │ interim transcripts ──▶ side queue ──────────────────────────────────────┐
        ▼                                                                            ▼
    iterate(turn runs) | concatmap(deliver each turn's events, in turn order) ── merge ──▶ events

So a final transcript goes to QA at once, and the reply of turn N streams back while turn N+1 is
being heard (and recognized, and answered). Every queue is bounded: audio chunks per utterance,
interim transcripts, and the turns started but not yet delivered (`max_turns_ahead`; beyond it the
feeder stops reading the client). A slow stage or a slow reader slows the session down to the
client's stream (gRPC flow control), and memory stays bounded. A stage that fails or times out
becomes a TurnError event for that turn, followed by its report; the session goes on.

Latency: a turn starts at the end of the user's utterance (the moment the chain reads the text turn,
or the EndOfUtterance of a spoken one) and ends when its reply is ready. Its stages run back to back
in one coroutine; each is recorded with `TurnRecorder.record_remote`: its round trip from the chain's
side, the stage server's own time inside it, and the gap between them (`<stage>.network`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import grpc
from aiostream import pipe, stream
from aiostream.core import Stream
from realtime_qa.pipeline.client import AnswerOptions
from realtime_qa.pipeline.stages import QARequest, QAResult, StageError, Stages, TraceIds
from realtime_qa.qacore.latency import MS, STAGES, Budgets, TurnRecorder, TurnReport
from realtime_qa.services.asr_stub import (
    AudioEncoding,
    AudioFrame,
    EndFrame,
    Recognition,
    RecognitionSettings,
    TextFrame,
    UtteranceFrame,
)
from realtime_qa.services.response_service import Outcome, Reply, ReplyRequest

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


class TurnRun:
    """One turn running as its own task: stage after stage, its events queued for in-order delivery."""

    def __init__(self, utterance: Utterance) -> None:
        self.utterance = utterance
        self.events: asyncio.Queue[ChainEvent | object] = asyncio.Queue()  # a turn has at most 6 events
        self.task: asyncio.Task[None] | None = None

    def emit(self, event: ChainEvent) -> None:
        self.events.put_nowait(event)

    async def delivered(self) -> AsyncIterator[ChainEvent]:
        """The turn's events as they happen, up to its report."""
        while (event := await self.events.get()) is not _END:
            yield cast(ChainEvent, event)


class Conversation:
    """One session: a feeder task turns the client's inputs into turns, each turn runs as its own task.

    Turn tasks start as soon as an utterance starts (its audio streams to the recognizer at once) and
    run their stages back to back in one coroutine, so no hand-off between stages waits on the client
    or on another turn: a final transcript goes to QA at once, and turn N+1 is recognized (and
    answered) while turn N's reply is still being made or sent. At most `max_turns_ahead` turns are
    started but not yet delivered; beyond that the feeder stops reading the client.
    """

    def __init__(self, stages: Stages, chain: ChainSettings, session: SessionSettings, trace_id: str) -> None:
        self.stages = stages
        self.chain = chain
        self.session = session
        self.trace_id = trace_id
        self._interim: asyncio.Queue[TranscriptEvent | object] = asyncio.Queue(chain.max_queued_events)
        self._turn_slots = asyncio.Semaphore(chain.max_turns_ahead)
        self._runs: set[TurnRun] = set()
        self._stored_passage_id: str | None = None  # the QA server's id of the session's passage, once known

    def events(self, inputs: AsyncIterator[UserInput]) -> AsyncIterator[ChainEvent]:
        deliver: Any = self._deliver  # aiostream's operator signatures are looser than mypy can follow
        answered: Stream[ChainEvent] = stream.iterate(self._turn_runs(inputs)) | pipe.concatmap(deliver, task_limit=1)
        merged: Stream[ChainEvent] = stream.merge(self._interim_events(), self._then_close_interim(answered))
        return self._iterate(merged)

    async def _iterate(self, source: Stream[ChainEvent]) -> AsyncIterator[ChainEvent]:
        try:
            async with source.stream() as events:
                async for event in events:
                    yield event
        finally:
            for run in list(self._runs):
                if run.task is not None:
                    run.task.cancel()

    async def _deliver(self, run: TurnRun) -> AsyncIterator[ChainEvent]:
        try:
            async for event in run.delivered():
                yield event
        finally:
            self._runs.discard(run)
            self._turn_slots.release()

    # -- feeding ---------------------------------------------------------------------------------

    async def _turn_runs(self, inputs: AsyncIterator[UserInput]) -> AsyncIterator[TurnRun]:
        """Turns in order as they start; a separate task reads the client so audio keeps flowing."""
        queue: asyncio.Queue[TurnRun | object] = asyncio.Queue()  # bounded by the turn slots
        feeder = asyncio.create_task(self._feed(inputs, queue))
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, TurnRun)
                yield item
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder

    async def _feed(self, inputs: AsyncIterator[UserInput], queue: asyncio.Queue[TurnRun | object]) -> None:
        turn = 0
        current: Utterance | None = None

        async def start(stub_transcript: str) -> Utterance:
            nonlocal turn
            await self._turn_slots.acquire()  # at most max_turns_ahead turns in flight: backpressure
            turn += 1
            settings = RecognitionSettings(
                self.session.audio_encoding, self.session.interim_results, stub_transcript.strip()
            )
            utterance = Utterance(turn, TraceIds(f"{self.trace_id}/{turn}"), settings, self.chain.max_queued_chunks)
            run = TurnRun(utterance)
            run.task = asyncio.create_task(self._run_turn(run), name=f"turn {utterance.trace.trace_id}")
            self._runs.add(run)
            queue.put_nowait(run)
            return utterance

        try:
            async for item in inputs:
                if isinstance(item, UserText):
                    if current is not None:
                        raise InvalidInputError("a text turn inside a spoken turn (send EndOfUtterance first)")
                    if not item.text.strip() or len(item.text) > MAX_TEXT_CHARS:
                        raise InvalidInputError(f"a text turn must have 1..{MAX_TEXT_CHARS} characters")
                    utterance = await start("")
                    await utterance.end(TextFrame(item.text))
                elif isinstance(item, UserAudio):
                    if len(item.content) > MAX_CHUNK_BYTES:
                        raise InvalidInputError(f"an audio chunk of {len(item.content):,} bytes (limit 1 MiB)")
                    if current is None:
                        current = await start(item.stub_transcript)
                    await current.put(AudioFrame(item.content))
                else:
                    if current is None:
                        raise InvalidInputError("EndOfUtterance without a spoken turn")
                    await current.end(EndFrame(item.stub_transcript.strip()))
                    current = None
            if current is not None:  # the client half-closed in mid-utterance: that ends it
                await current.end()
            queue.put_nowait(_END)
        except InvalidInputError as exc:
            queue.put_nowait(exc)

    # -- one turn --------------------------------------------------------------------------------

    async def _run_turn(self, run: TurnRun) -> None:
        utterance = run.utterance
        turn, trace = utterance.turn, utterance.trace.trace_id
        stage = "asr"
        recorder: TurnRecorder | None = None
        try:
            final, error, done_ns = await self._recognize(utterance)
            assert utterance.end_ns is not None
            recorder = TurnRecorder(turn, trace, self.session.budgets, start_ns=utterance.end_ns)
            if error is not None or final is None:
                error = error or StageError("asr", grpc.StatusCode.INTERNAL, "no transcript")
                recorder.record("asr", utterance.end_ns, done_ns)
                run.emit(TurnErrorEvent(turn, trace, "asr", error.code, error.message))
                run.emit(ReportEvent(turn, trace, recorder.finish(end_ns=done_ns, error=str(error))))
                return
            recorder.record_remote("asr", utterance.end_ns, done_ns, {}, final.processing_ns)
            run.emit(TranscriptEvent(turn, trace, final.transcript, True, confidence=final.confidence))

            stage = "qa"
            errors: list[str] = []
            begin = time.perf_counter_ns()
            try:
                result = await self._answer(final.transcript, utterance.trace)
            except StageError as exc:
                recorder.record("qa", begin, time.perf_counter_ns())
                errors.append(str(exc))
                reply_request = ReplyRequest(Outcome.FAILED, final.transcript, error_message=str(exc))
                run.emit(TurnErrorEvent(turn, trace, "qa", exc.code, exc.message))
            else:
                timings = result.timings
                server_stages = {name: timings.stage_ns(name) for name in STAGES}
                recorder.record_remote("qa", begin, time.perf_counter_ns(), server_stages, timings.total_ns)
                reply_request = self._reply_request(final.transcript, result)
                run.emit(AnswerEvent(turn, trace, result))

            stage = "response"
            begin = time.perf_counter_ns()
            try:
                reply = await self.stages.response.respond(
                    reply_request, utterance.trace, self.chain.response_timeout_s
                )
            except StageError as exc:
                end = time.perf_counter_ns()
                recorder.record("response", begin, end)
                errors.append(str(exc))
                run.emit(TurnErrorEvent(turn, trace, "response", exc.code, exc.message))
            else:
                end = time.perf_counter_ns()
                recorder.record_remote("response", begin, end, {}, reply.processing_ns)
                run.emit(ReplyEvent(turn, trace, reply))
            # the turn ends when its reply is ready; sending it is the client stream's business
            run.emit(ReportEvent(turn, trace, recorder.finish(end_ns=end, error="; ".join(errors) or None)))
        except Exception as exc:  # a fault of the chain itself: this turn fails, the session goes on
            log.error("turn %s failed in %s", trace, stage, exc_info=exc)
            message = f"internal error ({type(exc).__name__})"
            run.emit(TurnErrorEvent(turn, trace, stage, grpc.StatusCode.INTERNAL, message))
            if recorder is None:
                recorder = TurnRecorder(turn, trace, self.session.budgets, start_ns=utterance.end_ns)
            run.emit(ReportEvent(turn, trace, recorder.finish(error=f"{stage}: INTERNAL: {message}")))
        finally:
            run.events.put_nowait(_END)

    async def _recognize(self, utterance: Utterance) -> tuple[Recognition | None, StageError | None, int]:
        """The final transcript (or the failure) and when it reached the chain; interim ones go out at once."""
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
        return final, error, done_ns

    async def _interim_events(self) -> AsyncIterator[ChainEvent]:
        while (event := await self._interim.get()) is not _END:
            assert isinstance(event, TranscriptEvent)
            yield event

    async def _then_close_interim(self, source: Stream[ChainEvent]) -> AsyncIterator[ChainEvent]:
        async with source.stream() as events:
            async for event in events:
                yield event
        await self._interim.put(_END)

    async def _answer(self, question: str, trace: TraceIds) -> QAResult:
        """Ask QA within the QA budget (the call's deadline). After the first answer the passage goes by
        the id the QA server gave it; should the server have evicted it, the text goes again (once)."""
        deadline_ns = time.perf_counter_ns() + (self.session.budgets.of("qa") or 10 * MS)
        passage_id = self.session.passage_id or self._stored_passage_id
        passage = None if passage_id else self.session.passage
        request = QARequest(
            question, passage, passage_id, deadline_ns / 1e9 - time.perf_counter_ns() / 1e9,
            self.session.model_id, self.session.qa_options,
        )  # fmt: skip
        try:
            result = await self.stages.qa.answer(request, trace)
        except StageError as exc:
            remaining_s = (deadline_ns - time.perf_counter_ns()) / 1e9
            if exc.code is not grpc.StatusCode.NOT_FOUND or self.session.passage is None or passage is not None:
                raise
            if remaining_s <= 0:
                raise StageError("qa", grpc.StatusCode.DEADLINE_EXCEEDED, "passage evicted; no time left") from None
            self._stored_passage_id = None
            result = await self.stages.qa.answer(replace(request, passage=self.session.passage, passage_id=None,
                                                         deadline_s=remaining_s), trace)  # fmt: skip
        if self.session.passage is not None and result.passage_id:
            self._stored_passage_id = result.passage_id
        return result

    def _reply_request(self, question: str, result: QAResult) -> ReplyRequest:
        want_audio = self.session.want_audio
        if result.abstained or result.best is None:
            return ReplyRequest(Outcome.ABSTAINED, question, want_audio=want_audio)
        # The answer's score is its confidence (qacore.confidence): with allow_null, the calibrated probability
        # that it is right, which the response stage's low-confidence rule is made for.
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
