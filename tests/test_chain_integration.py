"""The whole conversational chain (ASR stub -> QA on the real CPU engine -> response) over assistant.v1.

Two chains run for the module: one process, and split (each stage its own process on loopback). The
same scripted conversation (text and WAV turns) goes through both; each turn's transcript, answer,
reply and latency report are checked. The ASR stub has a known simulated delay (30 ms at the end of
each utterance): it must show up in the `asr` row, and every report's rows must add up to the turn.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from realtime_qa.pipeline.launcher import ChainConfig, RunningChain, start_chain
from realtime_qa.qacore.latency import MS, QA_SERVER_STAGES, parse_budgets
from realtime_qa.services.asr_stub import AsrStubConfig
from realtime_qa.services.response_service import ResponderConfig

from realtime_qa.assistant.v1 import assistant_pb2, assistant_pb2_grpc
from realtime_qa.qa.v1 import qa_pb2
from realtime_qa.response.v1 import response_pb2

pytestmark = pytest.mark.asyncio(loop_scope="module")

PASSAGE = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
    "their leader Rollo, agreed to swear fealty to King Charles III of West Francia."
)
ASR_DELAY_MS = 30.0
# Generous QA budget: these tests check the chain, not this loaded 2-core machine's engine latency.
BUDGETS_MS = {"qa": 5000.0, "turn": 10000.0}
EVENT_TIMEOUT_S = 60.0


def wav_bytes(seconds: float, rate: int = 16_000, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x01\x00" * int(rate * seconds) * channels)
    return buffer.getvalue()


def text_turn(text: str) -> list[assistant_pb2.ConverseRequest]:
    return [assistant_pb2.ConverseRequest(text=assistant_pb2.TextTurn(text=text))]


def audio_turn(audio: bytes, transcript: str, chunk: int = 8000) -> list[assistant_pb2.ConverseRequest]:
    requests = [
        assistant_pb2.ConverseRequest(
            audio=assistant_pb2.AudioChunk(content=audio[offset : offset + chunk], stub_transcript=transcript)
        )
        for offset in range(0, len(audio), chunk)
    ]
    end = assistant_pb2.EndOfUtterance(stub_transcript=transcript)
    return [*requests, assistant_pb2.ConverseRequest(end_of_utterance=end)]


@dataclass
class Turn:
    events: list[assistant_pb2.ConverseEvent] = field(default_factory=list)

    def of(self, kind: str) -> list[Any]:
        return [getattr(event, kind) for event in self.events if event.WhichOneof("event") == kind]

    @property
    def final_transcript(self) -> str:
        finals = [t.text for t in self.of("transcript") if t.is_final]
        assert len(finals) <= 1
        return finals[0] if finals else ""

    @property
    def report(self) -> assistant_pb2.LatencyReport:
        (report,) = self.of("report")
        return report

    def row(self, name: str) -> assistant_pb2.StageLatency:
        (row,) = [row for row in self.report.stages if row.name == name]
        return row


class Conversation:
    """A Converse call driven turn by turn: send a turn, collect its events up to its report."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.early: dict[int, list[assistant_pb2.ConverseEvent]] = {}

    async def send(self, requests: list[assistant_pb2.ConverseRequest]) -> None:
        for request in requests:
            await self.call.write(request)

    async def read(self) -> assistant_pb2.ConverseEvent:
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            event = await self.call.read()
        assert event is not grpc.aio.EOF, "the session ended early"
        return event

    async def until_report(self, turn: int) -> Turn:
        """Turn `turn`'s events up to its report (earlier turns are done; a later turn's interim
        transcripts, the only events allowed to come early, are set aside for it)."""
        collected = Turn(self.early.pop(turn, []))
        while True:
            event = await self.read()
            if event.turn != turn:
                assert event.turn > turn and event.WhichOneof("event") == "transcript"
                assert not event.transcript.is_final, "a later turn's final transcript overtook this turn"
                self.early.setdefault(event.turn, []).append(event)
                continue
            collected.events.append(event)
            if event.WhichOneof("event") == "report":
                return collected

    async def turn(self, requests: list[assistant_pb2.ConverseRequest], number: int) -> Turn:
        await self.send(requests)
        return await self.until_report(number)


def session_config(**overrides: Any) -> assistant_pb2.SessionConfig:
    config = assistant_pb2.SessionConfig(passage=PASSAGE, interim_results=True)
    for name, value in {**BUDGETS_MS, **overrides.pop("budgets_ms", {})}.items():
        config.budgets_ms[name] = value
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


async def open_conversation(
    target: str, config: assistant_pb2.SessionConfig, trace_id: str = "test-session"
) -> tuple[grpc.aio.Channel, Conversation]:
    channel = grpc.aio.insecure_channel(target)
    call = assistant_pb2_grpc.AssistantStub(channel).Converse(metadata=(("x-trace-id", trace_id),))
    conversation = Conversation(call)
    await call.write(assistant_pb2.ConverseRequest(config=config))
    started = await conversation.read()
    assert started.WhichOneof("event") == "started" and started.turn == 0
    assert started.started.trace_id == trace_id
    assert started.started.budgets_ms["qa"] == pytest.approx(config.budgets_ms["qa"])
    return channel, conversation


def chain_config(split: bool, engine_dir: Path) -> ChainConfig:
    return ChainConfig(
        engine_dir=engine_dir,
        split=split,
        assistant_port=0,
        dashboard_port=None,
        asr=AsrStubConfig(final_latency_ms=ASR_DELAY_MS),
        responder=ResponderConfig(speech=True),
        budgets=parse_budgets("qa=5s,turn=10s"),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["one-process", "split"])
async def chain(request: pytest.FixtureRequest, engine_dir: Path) -> AsyncIterator[RunningChain]:
    async with start_chain(chain_config(request.param == "split", engine_dir)) as running:
        yield running


async def test_scripted_conversation_with_text_and_audio_turns(chain: RunningChain) -> None:
    channel, conversation = await open_conversation(chain.assistant_target, session_config())
    async with channel:
        script = [
            (text_turn("Who was the Norse leader?"), "Who was the Norse leader?", "Rollo"),
            (
                audio_turn(wav_bytes(1.2), "What region did the Normans give their name to?"),
                "What region did the Normans give their name to?",
                "Normandy",
            ),
            (text_turn("Which king did they swear fealty to?"), "Which king did they swear fealty to?", "Charles III"),
        ]
        turns = []
        for number, (requests, transcript, answer) in enumerate(script, start=1):
            turn = await conversation.turn(requests, number)
            turns.append(turn)
            assert turn.final_transcript == transcript
            (answered,) = turn.of("answer")
            assert answer in answered.text and not answered.abstained
            assert PASSAGE[answered.start : answered.end] == answered.text
            assert answered.engine == "onnxruntime-fp32"
            (reply,) = turn.of("reply")
            assert answered.text in reply.text
            assert reply.kind in (response_pb2.REPLY_ANSWER, response_pb2.REPLY_LOW_CONFIDENCE)
            assert reply.audio_status == response_pb2.AUDIO_NOT_REQUESTED and not reply.audio
            assert not turn.of("error") and not turn.report.error
            assert all(event.trace_id == f"test-session/{number}" for event in turn.events)
            kinds = [event.WhichOneof("event") for event in turn.events if event.WhichOneof("event") != "transcript"]
            assert kinds == ["answer", "reply", "report"]
        # the spoken turn streamed interim transcripts (words of its transcript, growing) before the final one
        interim = [t.text for t in turns[1].of("transcript") if not t.is_final]
        assert interim and all("What region did the Normans".startswith(text) for text in interim)
        await conversation.call.done_writing()
        assert await conversation.call.read() is grpc.aio.EOF
        assert ("x-trace-id", "test-session") in tuple(await conversation.call.trailing_metadata())


async def test_a_malformed_message_ends_the_session_with_invalid_argument(chain: RunningChain) -> None:
    async with grpc.aio.insecure_channel(chain.assistant_target) as channel:
        raw = channel.stream_stream("/assistant.v1.Assistant/Converse")  # bytes in, bytes out
        call = raw()
        await call.write(b"\xff\xff\xff")  # then no half-close: it could race the abort (grpc/grpc#36066)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async with asyncio.timeout(EVENT_TIMEOUT_S):
                await call.read()
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed" in (failure.value.details() or "")


async def test_latency_reports_add_up_and_show_the_injected_asr_delay(chain: RunningChain) -> None:
    channel, conversation = await open_conversation(chain.assistant_target, session_config())
    async with channel:
        for number in range(1, 4):
            turn = await conversation.turn(text_turn("Who was the Norse leader?"), number)
            report = turn.report
            names = [row.name for row in report.stages]
            expected = ["asr", "asr.network", "qa", *(f"qa.{s}" for s in QA_SERVER_STAGES.names), "qa.network"]
            assert names == [*expected, "response", "response.network"]
            top = [row for row in report.stages if "." not in row.name]
            # stage durations (the network gaps are inside them) add up to the end-to-end time within 5 %
            attributed = sum(row.duration_ns for row in top)
            assert attributed <= report.total_ns
            assert attributed >= 0.95 * report.total_ns, (attributed, report.total_ns)
            assert report.unattributed_ns == report.total_ns - attributed
            # the top-level stages are back to back, in order
            for before, after in itertools.pairwise(top):
                assert after.start_ns >= before.start_ns + before.duration_ns
            # each remote stage = its server's own rows + its network gap
            qa_rows = [turn.row(f"qa.{s}") for s in QA_SERVER_STAGES.names]
            assert turn.row("qa").duration_ns >= turn.row("qa.network").duration_ns
            assert sum(row.duration_ns for row in qa_rows) <= turn.row("qa").duration_ns
            assert turn.row("qa.infer").duration_ns > 0
            # the 30 ms simulated by the ASR stub is attributed to asr, on the server's side of it
            asr, asr_network = turn.row("asr"), turn.row("asr.network")
            assert asr.duration_ns >= ASR_DELAY_MS * MS
            assert asr.duration_ns - asr_network.duration_ns >= ASR_DELAY_MS * MS
            assert asr.budget_ns == 50 * MS and turn.row("qa").budget_ns == BUDGETS_MS["qa"] * MS
            assert report.turn_budget_ns == BUDGETS_MS["turn"] * MS
        await conversation.call.done_writing()


async def test_every_turn_reaches_the_board(chain: RunningChain) -> None:
    before = chain.board.turns_total
    channel, conversation = await open_conversation(chain.assistant_target, session_config())
    async with channel:
        await conversation.turn(text_turn("Who was the Norse leader?"), 1)
        await conversation.turn(audio_turn(wav_bytes(0.3), ""), 2)  # fails in the ASR stub: still recorded
        await conversation.call.done_writing()
    assert chain.board.turns_total == before + 2
    assert chain.board.snapshot()["info"]["engine"] == "onnxruntime-fp32"


async def test_a_failing_stage_yields_an_error_event_and_the_session_goes_on(chain: RunningChain) -> None:
    channel, conversation = await open_conversation(chain.assistant_target, session_config())
    async with channel:
        failed = await conversation.turn(audio_turn(wav_bytes(0.5), ""), 1)  # audio the stub has no transcript for
        (error,) = failed.of("error")
        assert error.stage == "asr" and error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "cannot recognize speech" in error.message
        assert not failed.of("answer") and not failed.of("reply")
        assert "cannot recognize speech" in failed.report.error
        assert [row.name for row in failed.report.stages] == ["asr"]
        broken = await conversation.turn(audio_turn(b"RIFF\x00\x00\x00\x00WAVEjunk" * 4, "x"), 2)
        (error,) = broken.of("error")
        assert error.stage == "asr" and error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        recovered = await conversation.turn(text_turn("Who was the Norse leader?"), 3)
        assert recovered.of("answer")[0].text == "Rollo" and not recovered.of("error")
        await conversation.call.done_writing()


async def test_a_failing_qa_stage_fails_each_turn_and_the_session_goes_on(chain: RunningChain) -> None:
    """An unknown passage_id: QA fails (NOT_FOUND, not a timeout) on every turn; each turn still gets its
    error event, an apology and its report, and the next turn runs."""
    config = session_config()
    config.passage_id = "no-such-passage"
    channel, conversation = await open_conversation(chain.assistant_target, config)
    async with channel:
        for number in (1, 2):
            turn = await conversation.turn(text_turn("Who was the Norse leader?"), number)
            (error,) = turn.of("error")
            assert error.stage == "qa" and error.code == grpc.StatusCode.NOT_FOUND.value[0]
            assert not turn.of("answer")
            (reply,) = turn.of("reply")
            assert reply.kind == response_pb2.REPLY_ERROR
            assert "NOT_FOUND" in turn.report.error
            assert [row.name for row in turn.report.stages if "." not in row.name] == ["asr", "qa", "response"]
        await conversation.call.done_writing()
        assert await conversation.call.read() is grpc.aio.EOF


async def test_pcm16_audio_options_and_request_ids_as_the_contract_says(chain: RunningChain) -> None:
    """audio_format PCM16 (raw samples), qa_options.timeout_ms ignored (the QA budget is the deadline),
    x-request-id echoed in the initial metadata."""
    config = session_config(audio_format=assistant_pb2.PCM16)
    config.qa_options.timeout_ms = 1  # would fail every call if it were the deadline
    channel = grpc.aio.insecure_channel(chain.assistant_target)
    metadata = (("x-trace-id", "pcm-session"), ("x-request-id", "pcm-request"))
    call = assistant_pb2_grpc.AssistantStub(channel).Converse(metadata=metadata)
    async with channel:
        assert ("x-request-id", "pcm-request") in tuple(await call.initial_metadata())
        conversation = Conversation(call)
        await call.write(assistant_pb2.ConverseRequest(config=config))
        assert (await conversation.read()).started.trace_id == "pcm-session"
        raw = wav_bytes(0.5)[44:]  # the samples without the RIFF header
        turn = await conversation.turn(audio_turn(raw, "Who was the Norse leader?"), 1)
        assert not turn.of("error") and turn.of("answer")[0].text == "Rollo"
        await call.done_writing()


async def test_answer_offsets_are_code_points_of_a_non_ascii_passage(chain: RunningChain) -> None:
    passage = "Zoë’s café 🎉 — the Normans’ leader was Rollo, a Norse chieftain who settled in Normandy."
    channel, conversation = await open_conversation(chain.assistant_target, session_config(passage=passage))
    async with channel:
        turn = await conversation.turn(text_turn("Who was the leader of the Normans?"), 1)
        (answer,) = turn.of("answer")
        assert "Rollo" in answer.text and passage[answer.start : answer.end] == answer.text
        await conversation.call.done_writing()


async def test_a_qa_call_that_cannot_make_its_budget_is_reported_not_dropped(chain: RunningChain) -> None:
    config = session_config(budgets_ms={"qa": 0.001})  # 1 us: the QA call's deadline passes first
    channel, conversation = await open_conversation(chain.assistant_target, config)
    async with channel:
        for number in (1, 2):
            turn = await conversation.turn(text_turn("Who was the Norse leader?"), number)
            (error,) = turn.of("error")
            assert error.stage == "qa" and error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            (reply,) = turn.of("reply")
            assert reply.kind == response_pb2.REPLY_ERROR and reply.text.startswith("Sorry")
            assert turn.report.error and turn.row("qa").over_budget
            assert turn.final_transcript == "Who was the Norse leader?"
        await conversation.call.done_writing()


async def test_reply_of_one_turn_streams_back_while_the_next_is_being_heard(chain: RunningChain) -> None:
    channel, conversation = await open_conversation(chain.assistant_target, session_config())
    async with channel:
        audio = wav_bytes(1.0)
        await conversation.send(text_turn("Who was the Norse leader?"))
        # turn 2 starts before turn 1 is answered; its end comes only after turn 1's reply is back
        await conversation.call.write(
            assistant_pb2.ConverseRequest(audio=assistant_pb2.AudioChunk(content=audio[:16000], stub_transcript="x"))
        )
        first = await conversation.until_report(1)
        assert first.of("reply")[0].text == "Rollo."
        await conversation.send(audio_turn(audio[16000:], "Who was the Norse leader?"))
        second = await conversation.until_report(2)
        assert second.final_transcript == "Who was the Norse leader?"
        assert second.of("answer")[0].text == "Rollo"
        await conversation.call.done_writing()


async def test_spoken_replies_are_real_audio_or_declared_unavailable(chain: RunningChain) -> None:
    channel, conversation = await open_conversation(chain.assistant_target, session_config(want_audio=True))
    async with channel:
        turn = await conversation.turn(text_turn("Who was the Norse leader?"), 1)
        (reply,) = turn.of("reply")
        if reply.audio_status == response_pb2.AUDIO_SYNTHESIZED:
            with wave.open(io.BytesIO(reply.audio)) as spoken:
                assert spoken.getnframes() > spoken.getframerate() * 0.2  # a spoken word lasts
        else:
            assert reply.audio_status == response_pb2.AUDIO_UNAVAILABLE and not reply.audio
            assert "espeak-ng" in reply.audio_detail
        await conversation.call.done_writing()


@pytest.mark.parametrize(
    ("first", "then", "message"),
    [
        (assistant_pb2.ConverseRequest(text=assistant_pb2.TextTurn(text="hi")), None, "first message"),
        (
            assistant_pb2.ConverseRequest(config=assistant_pb2.SessionConfig(passage=PASSAGE, budgets_ms={"llm": 5})),
            None,
            "unknown stage",
        ),
        (
            assistant_pb2.ConverseRequest(config=assistant_pb2.SessionConfig(passage=PASSAGE, budgets_ms={"qa": -1})),
            None,
            "budget",
        ),
        (assistant_pb2.ConverseRequest(config=assistant_pb2.SessionConfig(passage="  ")), None, "empty"),
        (assistant_pb2.ConverseRequest(config=assistant_pb2.SessionConfig()), None, "neither passage"),
        (
            assistant_pb2.ConverseRequest(config=assistant_pb2.SessionConfig(passage=PASSAGE)),
            assistant_pb2.ConverseRequest(end_of_utterance=assistant_pb2.EndOfUtterance()),
            "without a spoken turn",
        ),
        (
            assistant_pb2.ConverseRequest(config=assistant_pb2.SessionConfig(passage=PASSAGE)),
            assistant_pb2.ConverseRequest(text=assistant_pb2.TextTurn(text="   ")),
            "text turn",
        ),
        (
            assistant_pb2.ConverseRequest(config=assistant_pb2.SessionConfig(passage=PASSAGE)),
            assistant_pb2.ConverseRequest(config=assistant_pb2.SessionConfig(passage=PASSAGE)),
            "second SessionConfig",
        ),
        (assistant_pb2.ConverseRequest(config=assistant_pb2.SessionConfig(passage="x" * 1_000_001)), None, "1,000,000"),
        (
            assistant_pb2.ConverseRequest(
                config=assistant_pb2.SessionConfig(passage=PASSAGE, qa_options=qa_pb2.AnswerOptions(n_best_size=0))
            ),
            None,
            "n_best_size",
        ),
        (
            assistant_pb2.ConverseRequest(
                config=assistant_pb2.SessionConfig(
                    passage=PASSAGE, qa_options=qa_pb2.AnswerOptions(max_answer_length=513)
                )
            ),
            None,
            "max_answer_length",
        ),
        (
            assistant_pb2.ConverseRequest(config=assistant_pb2.SessionConfig(passage=PASSAGE)),
            assistant_pb2.ConverseRequest(text=assistant_pb2.TextTurn(text="x" * 4097)),
            "4096",
        ),
        (
            assistant_pb2.ConverseRequest(config=assistant_pb2.SessionConfig(passage=PASSAGE)),
            assistant_pb2.ConverseRequest(audio=assistant_pb2.AudioChunk(content=bytes(1024 * 1024 + 2))),
            "1 MiB",
        ),
    ],
)
async def test_protocol_errors_end_the_session_with_invalid_argument(
    chain: RunningChain, first: Any, then: Any, message: str
) -> None:
    async with grpc.aio.insecure_channel(chain.assistant_target) as channel:
        call = assistant_pb2_grpc.AssistantStub(channel).Converse()
        await call.write(first)
        if then is not None:
            await call.write(then)
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async with asyncio.timeout(EVENT_TIMEOUT_S):
                async for _ in call:
                    pass
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (failure.value.details() or "")


async def test_every_server_reports_health(chain: RunningChain) -> None:
    targets = {chain.assistant_target: "assistant.v1.Assistant", chain.qa_target: "qa.v1.QuestionAnswering"}
    if chain.asr_target and chain.response_target:
        targets |= {chain.asr_target: "asr.v1.Recognizer", chain.response_target: "response.v1.Responder"}
    for target, service in targets.items():
        async with grpc.aio.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                response = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert response.status == health_pb2.HealthCheckResponse.SERVING, (target, name)
