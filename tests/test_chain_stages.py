"""The chain's stages on their own: the ASR stub's rules, the reply templates and speech, a dead stage."""

from __future__ import annotations

import asyncio
import io
import shutil
import struct
import wave
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import grpc
import pytest
from realtime_qa.pipeline.chain import (
    AnswerEvent,
    Chain,
    ChainSettings,
    ReplyEvent,
    ReportEvent,
    SessionSettings,
    SessionStarted,
    TranscriptEvent,
    TurnErrorEvent,
    UserInput,
    UserText,
)
from realtime_qa.pipeline.front import AssistantService, assistant_server
from realtime_qa.pipeline.grpc_stages import GrpcQuestionAnswering, GrpcResponder
from realtime_qa.pipeline.local_stages import LocalQuestionAnswering, LocalRecognizer, LocalResponder
from realtime_qa.pipeline.stages import QARequest, QAResult, StageError, Stages, TraceIds
from realtime_qa.qacore.latency import TurnReport, parse_budgets
from realtime_qa.services.asr_stub import (
    AsrStub,
    AsrStubConfig,
    AudioEncoding,
    AudioFrame,
    EndFrame,
    Recognition,
    RecognitionError,
    RecognitionSettings,
    TextFrame,
    UtteranceFrame,
    asr_server,
)
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.response_service import (
    AudioStatus,
    Outcome,
    ReplyKind,
    ReplyMaker,
    ReplyRequest,
    ResponderConfig,
)
from realtime_qa.services.server import QAServer

from realtime_qa.asr.v1 import asr_pb2, asr_pb2_grpc
from realtime_qa.assistant.v1 import assistant_pb2, assistant_pb2_grpc


def wav_bytes(seconds: float, rate: int = 16_000, channels: int = 1, width: int = 2) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(b"\x00" * width * channels * int(rate * seconds))
    return buffer.getvalue()


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    return (data[offset : offset + size] for offset in range(0, len(data), size))


async def status_of_a_refused_stream(stub: asr_pb2_grpc.RecognizerStub, *requests: object) -> grpc.StatusCode:
    """Write `requests` (the server refuses the last), then only read: the status the server ends the call with.

    Nothing follows the refused request, not even a half-close: a client write racing the server's abort
    can end the call in INTERNAL instead of the server's status (grpc/grpc#36066).
    """
    call = stub.StreamingRecognize()
    for request in requests:
        await call.write(request)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async with asyncio.timeout(30):
            await call.read()
    return failure.value.code()


async def frames(items: Iterable[UtteranceFrame]) -> AsyncIterator[UtteranceFrame]:
    for item in items:
        yield item


async def recognize(
    settings: RecognitionSettings, items: Iterable[UtteranceFrame], config: AsrStubConfig | None = None
) -> list[Recognition]:
    return [result async for result in AsrStub(config).recognize(settings, frames(items))]


# -- ASR stub ----------------------------------------------------------------------------------------


async def test_text_passes_through_as_the_final_transcript() -> None:
    (result,) = await recognize(RecognitionSettings(), [TextFrame("  Who was Rollo?  ")])
    assert (result.transcript, result.is_final, result.confidence) == ("Who was Rollo?", True, 1.0)


async def test_wav_audio_takes_its_transcript_from_the_end_frame_and_reports_interim_words() -> None:
    audio = wav_bytes(2.0)
    settings = RecognitionSettings(AudioEncoding.WAV, interim_results=True, stub_transcript="one two three four five")
    items: list[UtteranceFrame] = [AudioFrame(chunk) for chunk in chunks(audio, 8000)]
    results = await recognize(settings, [*items, EndFrame("one two three four five six")])
    *interim, final = results
    assert final.is_final and final.transcript == "one two three four five six"
    assert final.audio_seconds == pytest.approx(2.0)
    assert [r.transcript for r in interim] == ["one", "one two", "one two three", "one two three four"]
    assert all(not r.is_final and r.stability == 0.5 for r in interim)


async def test_pcm16_audio_falls_back_to_the_config_transcript() -> None:
    settings = RecognitionSettings(AudioEncoding.PCM16, stub_transcript="from the config")
    (result,) = await recognize(settings, [AudioFrame(b"\x00\x00" * 1600), EndFrame()])
    assert result.transcript == "from the config" and result.audio_seconds == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("settings", "items", "code", "message"),
    [
        (RecognitionSettings(), [AudioFrame(wav_bytes(0.2)), EndFrame()], "FAILED_PRECONDITION", "cannot recognize"),
        (RecognitionSettings(), [AudioFrame(wav_bytes(0.2, rate=8000)), EndFrame("x")], "INVALID_ARGUMENT", "8000"),
        (RecognitionSettings(), [AudioFrame(wav_bytes(0.2, channels=2)), EndFrame("x")], "INVALID_ARGUMENT", "2 ch"),
        (RecognitionSettings(), [AudioFrame(b"OggS" + bytes(60)), EndFrame("x")], "INVALID_ARGUMENT", "RIFF"),
        (RecognitionSettings(), [AudioFrame(wav_bytes(0.2)[:30]), EndFrame("x")], "INVALID_ARGUMENT", "header"),
        (RecognitionSettings(AudioEncoding.PCM16), [AudioFrame(b"\x00" * 3), EndFrame("x")], "INVALID_ARGUMENT", "odd"),
        (RecognitionSettings(), [EndFrame("x")], "INVALID_ARGUMENT", "without text or audio"),
        (RecognitionSettings(), [TextFrame("   ")], "INVALID_ARGUMENT", "characters"),
        (RecognitionSettings(), [AudioFrame(wav_bytes(0.1)), TextFrame("hi")], "INVALID_ARGUMENT", "text frame"),
        (RecognitionSettings(), [AudioFrame(b"\x00" * (1024 * 1024 + 1))], "INVALID_ARGUMENT", "exceeds"),
    ],
)
async def test_unrecognizable_utterances_fail_with_a_status(
    settings: RecognitionSettings, items: list[UtteranceFrame], code: str, message: str
) -> None:
    with pytest.raises(RecognitionError) as failure:
        await recognize(settings, items)
    assert failure.value.code.name == code and message in failure.value.message


async def test_utterances_longer_than_the_limit_fail() -> None:
    config = AsrStubConfig(max_utterance_s=0.5)
    items = [AudioFrame(chunk) for chunk in chunks(wav_bytes(1.0), 8000)]
    with pytest.raises(RecognitionError, match=r"longer than 0\.5 s"):
        await recognize(RecognitionSettings(), [*items, EndFrame("x")], config)


async def test_a_wav_with_extra_chunks_before_its_data_is_read() -> None:
    audio = wav_bytes(0.5)
    data_at = audio.index(b"data")
    extra = b"LIST" + struct.pack("<I", 6) + b"INFOab"
    with_list = audio[:data_at] + extra + audio[data_at:]
    (result,) = await recognize(
        RecognitionSettings(), [AudioFrame(with_list[:20]), AudioFrame(with_list[20:]), EndFrame("x")]
    )
    assert result.audio_seconds == pytest.approx(0.5)


async def test_the_asr_server_speaks_asr_v1_and_reports_failures_in_band() -> None:
    server = asr_server(AsrStub())
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = asr_pb2_grpc.RecognizerStub(channel)
            config = asr_pb2.StreamingRecognizeRequest(config=asr_pb2.RecognitionConfig(encoding=asr_pb2.WAV))
            text = asr_pb2.StreamingRecognizeRequest(text="Who was Rollo?")
            (result,) = [message async for message in stub.StreamingRecognize(iter([config, text]))]
            assert result.is_final and result.transcript == "Who was Rollo?"
            audio = asr_pb2.StreamingRecognizeRequest(audio=asr_pb2.AudioChunk(content=wav_bytes(0.1)))
            end = asr_pb2.StreamingRecognizeRequest(end_of_utterance=asr_pb2.EndOfUtterance())
            (failed,) = [message async for message in stub.StreamingRecognize(iter([config, audio, end]))]
            assert failed.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            assert await status_of_a_refused_stream(stub, text) == grpc.StatusCode.INVALID_ARGUMENT  # no config first
    finally:
        await server.stop()


# -- response ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "kind", "text"),
    [
        (ReplyRequest(Outcome.ANSWERED, "Who?", "rollo", 0.9), ReplyKind.ANSWER, "Rollo."),
        (ReplyRequest(Outcome.ANSWERED, "Who?", "Rollo", 0.1), ReplyKind.LOW_CONFIDENCE, "I think it is Rollo, but"),
        (
            ReplyRequest(Outcome.ANSWERED, "Who?", "Rollo", 0.6, low_confidence_below=0.7),
            ReplyKind.LOW_CONFIDENCE,
            "I think",
        ),
        (ReplyRequest(Outcome.ABSTAINED, "Who?"), ReplyKind.ABSTAINED, "I couldn't find that in the passage."),
        (ReplyRequest(Outcome.FAILED, "Who?", error_message="qa: DEADLINE"), ReplyKind.ERROR, "Sorry"),
    ],
)
async def test_reply_templates(request_: ReplyRequest, kind: ReplyKind, text: str) -> None:
    reply = await ReplyMaker(ResponderConfig(speech=False)).respond(request_)
    assert reply.kind is kind and reply.text.startswith(text)
    assert reply.audio_status is AudioStatus.NOT_REQUESTED and reply.audio == b""


async def test_without_a_synthesizer_no_audio_is_produced_and_it_says_so() -> None:
    maker = ReplyMaker(ResponderConfig(espeak_program="no-such-tts-program"))
    reply = await maker.respond(ReplyRequest(Outcome.ABSTAINED, "Who?", want_audio=True))
    assert not maker.audio_available
    assert reply.audio_status is AudioStatus.UNAVAILABLE and reply.audio == b""
    assert "not installed" in reply.audio_detail


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
async def test_espeak_ng_speaks_the_reply() -> None:
    reply = await ReplyMaker().respond(ReplyRequest(Outcome.ANSWERED, "Who?", "Rollo", 0.9, want_audio=True))
    assert reply.audio_status is AudioStatus.SYNTHESIZED
    with wave.open(io.BytesIO(reply.audio)) as spoken:
        assert spoken.getnchannels() == 1 and spoken.getsampwidth() == 2
        assert spoken.getnframes() > 0.2 * spoken.getframerate()


@pytest.mark.parametrize(
    "bad",
    [
        ReplyRequest(Outcome.ANSWERED, "Who?", "", 0.9),
        ReplyRequest(Outcome.ANSWERED, "Who?", "x", 1.5),
        ReplyRequest(Outcome.ANSWERED, "Who?", "x" * 5000, 0.5),
        ReplyRequest(Outcome.ANSWERED, "Who?", "x", float("nan")),
    ],
)
async def test_bad_reply_requests_are_refused(bad: ReplyRequest) -> None:
    with pytest.raises(ValueError):
        await ReplyMaker(ResponderConfig(speech=False)).respond(bad)


# -- a dead stage ------------------------------------------------------------------------------------


async def test_a_dead_response_server_fails_each_turn_and_the_session_goes_on(engine_dir: Path) -> None:
    """The real gRPC responder adapter pointed at a port nobody listens on: UNAVAILABLE per turn."""
    async with QAServer(ServerConfig(port=0, engines=(EngineSpec(engine_dir),), grace_s=1.0)) as qa:
        stages = Stages(LocalRecognizer(AsrStub()), LocalQuestionAnswering(qa), GrpcResponder("127.0.0.1:1"))
        chain = Chain(stages, ChainSettings(response_timeout_s=2.0))
        session = SessionSettings(passage="Rollo led the Norse raiders.", budgets=parse_budgets("qa=5s"))

        async def inputs() -> AsyncIterator[UserInput]:
            yield UserText("Who led the raiders?")
            yield UserText("Who led them?")

        events = [event async for event in chain.converse(session, "dead", inputs())]
        await chain.close()
    reports = [event for event in events if isinstance(event, ReportEvent)]
    errors = [event for event in events if isinstance(event, TurnErrorEvent)]
    assert [report.turn for report in reports] == [1, 2]
    assert [(error.stage, error.code) for error in errors] == [("response", grpc.StatusCode.UNAVAILABLE)] * 2
    assert not any(isinstance(event, ReplyEvent) for event in events)
    assert all(report.report.error and "response" in report.report.error for report in reports)
    finals = [event.text for event in events if isinstance(event, TranscriptEvent) and event.is_final]
    assert finals == ["Who led the raiders?", "Who led them?"]


async def test_a_reader_that_stops_reading_stops_the_chain_reading_its_client(engine_dir: Path) -> None:
    """Backpressure: with max_turns_ahead turns started but undelivered, the chain reads no further input."""
    async with QAServer(ServerConfig(port=0, engines=(EngineSpec(engine_dir),), grace_s=1.0)) as qa:
        stages = Stages(LocalRecognizer(AsrStub()), LocalQuestionAnswering(qa), LocalResponder(ReplyMaker()))
        settings = ChainSettings(max_turns_ahead=2)
        chain = Chain(stages, settings)
        session = SessionSettings(passage="Rollo led the Norse raiders.", budgets=parse_budgets("qa=5s"))
        consumed = 0

        async def inputs() -> AsyncIterator[UserInput]:
            nonlocal consumed
            for number in range(12):
                consumed += 1
                yield UserText(f"Who led the raiders? ({number})")

        events = chain.converse(session, "slow-reader", inputs())
        assert isinstance(await anext(events), SessionStarted)

        async def read_one() -> object:
            return await anext(events)

        first = asyncio.create_task(read_one())  # the reader takes one event, then stops reading
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while consumed < settings.max_turns_ahead + 1:  # two turns started, the third input read and waiting
            assert loop.time() < deadline, "the chain never read its first turns"
            await asyncio.sleep(0.01)
        await first
        watch_until = loop.time() + 0.5  # an upper bound held over a window, not a synchronisation sleep
        while loop.time() < watch_until:
            assert consumed <= settings.max_turns_ahead + 1
            await asyncio.sleep(0.01)
        reports = [event.turn async for event in events if isinstance(event, ReportEvent)]
        assert reports == list(range(1, 13)) and consumed == 12
        await chain.close()


async def test_the_passage_goes_by_id_and_again_as_text_when_the_qa_server_evicted_it(engine_dir: Path) -> None:
    """A QA server that keeps one passage at a time: session A's passage is evicted by session B's, so A's
    next turn gets NOT_FOUND for its passage id and the chain sends the text again, within its budget."""
    config = ServerConfig(port=0, engines=(EngineSpec(engine_dir),), grace_s=1.0, passage_cache_chars=1)
    async with QAServer(config) as qa:
        calls: list[str] = []

        class WatchedQA(LocalQuestionAnswering):  # the real adapter, noting how each call went
            async def answer(self, request: QARequest, trace: TraceIds) -> QAResult:
                source = "id" if request.passage_id else "text"
                try:
                    result = await super().answer(request, trace)
                except StageError as exc:
                    calls.append(f"{source}:{exc.code.name}")
                    raise
                calls.append(f"{source}:OK")
                return result

        stages = Stages(LocalRecognizer(AsrStub()), WatchedQA(qa), LocalResponder(ReplyMaker()))
        chain = Chain(stages)
        budgets = parse_budgets("qa=5s")
        second_turn = asyncio.Event()

        async def inputs_a() -> AsyncIterator[UserInput]:
            yield UserText("Who led the raiders?")
            await second_turn.wait()
            yield UserText("Who led the raiders?")

        async def inputs_b() -> AsyncIterator[UserInput]:
            yield UserText("Where is Lima?")

        session_a = chain.converse(
            SessionSettings(passage="Rollo led the Norse raiders.", budgets=budgets), "a", inputs_a()
        )
        answers = []
        async for event in session_a:
            if isinstance(event, AnswerEvent) and event.result.best:
                answers.append(event.result.best.text)
            if isinstance(event, ReportEvent):
                break
        session_b = SessionSettings(passage="Lima is the capital of Peru.", budgets=budgets)
        assert [e async for e in chain.converse(session_b, "b", inputs_b()) if isinstance(e, TurnErrorEvent)] == []
        second_turn.set()
        async for event in session_a:
            assert not isinstance(event, TurnErrorEvent), event
            if isinstance(event, AnswerEvent) and event.result.best:
                answers.append(event.result.best.text)
        assert answers == ["Rollo", "Rollo"]
        assert calls == ["text:OK", "text:OK", "id:NOT_FOUND", "text:OK"]  # A, B, then A's fallback

        async def one_turn() -> AsyncIterator[UserInput]:
            yield UserText("Who led the raiders?")

        unknown = SessionSettings(passage_id="no-such-passage", budgets=budgets)
        failures = [event async for event in chain.converse(unknown, "unknown", one_turn())]
        await chain.close()
    codes = [(event.stage, event.code) for event in failures if isinstance(event, TurnErrorEvent)]
    assert codes == [("qa", grpc.StatusCode.NOT_FOUND)]


class ReportList(list[TurnReport]):
    """The simplest board: keeps every report."""

    def record(self, report: TurnReport) -> None:
        self.append(report)


async def test_sessions_beyond_the_limit_are_resource_exhausted() -> None:
    stages = Stages(LocalRecognizer(AsrStub()), GrpcQuestionAnswering("127.0.0.1:1"), LocalResponder(ReplyMaker()))
    service = AssistantService(Chain(stages), ReportList(), max_sessions=1)
    server = assistant_server(service)
    await server.start()
    config = assistant_pb2.ConverseRequest(config=assistant_pb2.SessionConfig(passage="Rollo led them."))
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = assistant_pb2_grpc.AssistantStub(channel)
            first = stub.Converse()
            await first.write(config)
            assert (await first.read()).WhichOneof("event") == "started"
            second = stub.Converse()
            await second.write(config)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await second.read()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await first.done_writing()
            assert await first.read() is grpc.aio.EOF
            third = stub.Converse()  # the first session's slot is free again
            await third.write(config)
            assert (await third.read()).WhichOneof("event") == "started"
            third.cancel()
    finally:
        await server.stop()
        await stages.close()


async def test_an_asr_stage_that_runs_out_of_time_fails_its_turn_only() -> None:
    """The ASR stub takes 2 s per utterance, the chain allows 0.1 s: each turn reports DEADLINE_EXCEEDED."""
    asr = LocalRecognizer(AsrStub(AsrStubConfig(final_latency_ms=2000)))
    stages = Stages(asr, GrpcQuestionAnswering("127.0.0.1:1"), LocalResponder(ReplyMaker()))
    chain = Chain(stages, ChainSettings(asr_timeout_s=0.1))

    async def inputs() -> AsyncIterator[UserInput]:
        yield UserText("Who led the raiders?")
        yield UserText("Who led them?")

    session = SessionSettings(passage="Rollo led the Norse raiders.")
    events = [event async for event in chain.converse(session, "slow-asr", inputs())]
    await chain.close()
    errors = [(event.turn, event.stage, event.code) for event in events if isinstance(event, TurnErrorEvent)]
    assert errors == [(1, "asr", grpc.StatusCode.DEADLINE_EXCEEDED), (2, "asr", grpc.StatusCode.DEADLINE_EXCEEDED)]
    reports = [event.report for event in events if isinstance(event, ReportEvent)]
    assert [report.turn for report in reports] == [1, 2]
    assert all(0.1 * 1e9 <= report.total_ns < 2 * 1e9 for report in reports)


# -- what the asr.v1 and response.v1 comments promise ----------------------------------------------


async def test_stage_servers_echo_the_request_id_and_refuse_misuse_as_documented() -> None:
    """asr.v1: x-request-id echoed in the initial metadata, a second config is INVALID_ARGUMENT on the stream,
    a sample rate other than 16 kHz an in-band INVALID_ARGUMENT. response.v1: x-request-id echoed in the
    trailing metadata, OUTCOME_UNSPECIFIED and out-of-range scores INVALID_ARGUMENT."""
    from realtime_qa.services.response_service import response_server

    from realtime_qa.response.v1 import response_pb2, response_pb2_grpc

    asr = asr_server(AsrStub())
    response = response_server(ReplyMaker(ResponderConfig(speech=False)))
    await asr.start()
    await response.start()
    metadata = (("x-trace-id", "session/7"), ("x-request-id", "session/7"))
    try:
        async with grpc.aio.insecure_channel(asr.target) as channel:
            stub = asr_pb2_grpc.RecognizerStub(channel)
            config = asr_pb2.StreamingRecognizeRequest(config=asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16))
            text = asr_pb2.StreamingRecognizeRequest(text="Who was Rollo?")
            call = stub.StreamingRecognize(iter([config, text]), metadata=metadata)
            assert ("x-request-id", "session/7") in tuple(await call.initial_metadata())
            assert [message.transcript async for message in call] == ["Who was Rollo?"]
            assert await status_of_a_refused_stream(stub, config, config) == grpc.StatusCode.INVALID_ARGUMENT
            eight_khz = asr_pb2.StreamingRecognizeRequest(
                config=asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16, sample_rate_hertz=8000)
            )
            (failed,) = [message async for message in stub.StreamingRecognize(iter([eight_khz, text]))]
            assert failed.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "16000" in failed.error.message
            assert not failed.is_final and not failed.transcript
        async with grpc.aio.insecure_channel(response.target) as channel:
            responder = response_pb2_grpc.ResponderStub(channel)
            answered = response_pb2.RespondRequest(outcome=response_pb2.ANSWERED, question="Who?", answer="Rollo")
            answered.score = 0.9
            call = responder.Respond(answered, metadata=metadata, timeout=10)
            reply = await call
            assert reply.text == "Rollo." and reply.kind == response_pb2.REPLY_ANSWER and reply.processing_ns > 0
            assert ("x-request-id", "session/7") in tuple(await call.trailing_metadata())
            default_threshold = response_pb2.RespondRequest(
                outcome=response_pb2.ANSWERED, question="Who?", answer="Rollo", score=0.29
            )
            assert (await responder.Respond(default_threshold, timeout=10)).kind == response_pb2.REPLY_LOW_CONFIDENCE
            for bad in (
                response_pb2.RespondRequest(question="Who?"),
                response_pb2.RespondRequest(outcome=response_pb2.ANSWERED, question="Who?", answer="Rollo", score=1.5),
                response_pb2.RespondRequest(outcome=response_pb2.ANSWERED, question="Who?"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await responder.Respond(bad, timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await response.stop()
        await asr.stop()


async def test_a_qa_target_is_asked_over_qa_connections_connections(engine_dir: Path) -> None:
    """`qa-pipeline --qa-target HOST:PORT --qa-connections 3`: the chain's QA stage holds three connections, each
    ready before the chain starts, and its questions go on the least busy."""
    import contextlib

    from realtime_qa.pipeline.launcher import ChainConfig, _start_stages
    from realtime_qa.pipeline.pipeline_cli import config_from_args

    parsed, _ = config_from_args(["--qa-target", "127.0.0.1:1", "--qa-connections", "3"])
    assert parsed.qa_connections == 3
    server = QAServer(ServerConfig(port=0, engines=(EngineSpec(engine_dir),)))
    async with server as qa, contextlib.AsyncExitStack() as stack:
        stages, _ = await _start_stages(ChainConfig(qa_target=qa.target, qa_connections=3), stack)
        assert isinstance(stages.qa, GrpcQuestionAnswering)
        client = stages.qa.client
        assert len(client.channels) == 3
        request = QARequest("Who led the raiders?", "The Normans were led by Rollo.", None, 30.0)
        results = await asyncio.gather(*(stages.qa.answer(request, TraceIds(f"turn-{turn}")) for turn in range(3)))
        assert [result.best.text if result.best else None for result in results] == ["Rollo"] * 3
        await client.close()
