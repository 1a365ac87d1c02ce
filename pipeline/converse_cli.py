"""`qa-assistant converse`: talk to the conversational chain from a terminal.

    qa-assistant converse -pf passage.txt                      # type turns; exit or quit leaves
    qa-assistant converse -pf passage.txt --turns-file turns.txt --json
    qa-assistant converse -p "..." --target 127.0.0.1:50061    # a running qa-pipeline

A turns file holds one user turn per line (blank lines and lines starting with # are skipped). A line
naming a .wav file (relative to the turns file) is a spoken turn: the WAV (16 kHz mono PCM16) is
streamed in chunks, and the transcript the ASR stub reports is read from the .txt file beside it
(`question.wav` -> `question.txt`). Without --target the chain starts in this process.

Each turn prints the transcript, the answer, the reply and a latency table coloured against the
budgets (colour only on a terminal); --json prints exactly one JSON object per turn instead.
Bad inputs are one line on stderr and exit code 2; an unreachable or failing chain exits with 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
from realtime_qa.qacore.cli_args import OneLineParser
from realtime_qa.qacore.errors import InvalidInputError, QAError
from realtime_qa.qacore.files import read_bytes, read_utf8
from realtime_qa.qacore.latency import MS, StageSpan, TurnReport, parse_budgets
from realtime_qa.services.stage_server import TRACE_ID_HEADER

from realtime_qa.assistant.v1 import assistant_pb2, assistant_pb2_grpc
from realtime_qa.response.v1 import response_pb2

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
CHUNK_BYTES = 8_000  # 0.25 s of 16 kHz PCM16 per audio message
MAX_WAV_BYTES = 64 * 1024 * 1024
QUIT_WORDS = frozenset({"exit", "quit"})
RED, GREEN, YELLOW, DIM, RESET = "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[2m", "\x1b[0m"

log = logging.getLogger("qa-assistant converse")


@dataclass(frozen=True)
class Turn:
    """One user turn to send: typed text, or a WAV file with its stub transcript."""

    text: str | None = None
    wav: Path | None = None
    stub_transcript: str = ""

    @property
    def label(self) -> str:
        return self.text if self.text is not None else str(self.wav)


@dataclass
class TurnOutcome:
    """Everything the chain sent back for one turn."""

    turn: int = 0
    trace_id: str = ""
    transcript: str = ""
    interim: list[str] = field(default_factory=list)
    answer: assistant_pb2.Answer | None = None
    reply: assistant_pb2.Reply | None = None
    errors: list[assistant_pb2.TurnError] = field(default_factory=list)
    report: TurnReport | None = None

    def as_dict(self) -> dict[str, Any]:
        assert self.report is not None
        report = self.report.as_dict()
        answer = self.answer
        return {
            "turn": self.turn,
            "trace_id": self.trace_id,
            "transcript": self.transcript,
            "answer": answer.text if answer is not None else None,
            "start": answer.start if answer is not None and not answer.abstained else None,
            "end": answer.end if answer is not None and not answer.abstained else None,
            "score": round(answer.score, 6) if answer is not None else None,
            "abstained": answer.abstained if answer is not None else None,
            "response": self.reply.text if self.reply is not None else None,
            "reply_kind": response_pb2.ReplyKind.Name(self.reply.kind) if self.reply is not None else None,
            "audio_status": response_pb2.AudioStatus.Name(self.reply.audio_status) if self.reply is not None else None,
            "errors": [
                {"stage": error.stage, "code": grpc.StatusCode(_code(error.code)).name, "message": error.message}
                for error in self.errors
            ],
            "stages": report["stages"],
            "total_ms": report["total_ms"],
            "turn_budget_ms": report["turn_budget_ms"],
            "unattributed_ms": report["unattributed_ms"],
            "over_budget": report["over_budget"],
        }


def _code(number: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value
    return grpc.StatusCode.UNKNOWN.value


def report_from_pb(turn: int, trace_id: str, message: assistant_pb2.LatencyReport) -> TurnReport:
    spans = tuple(StageSpan(row.name, row.start_ns, row.duration_ns, row.budget_ns or None) for row in message.stages)
    return TurnReport(turn, trace_id, message.total_ns, spans, message.turn_budget_ns, message.error or None)


# -- input -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="qa-assistant converse",
        description="Talk to the conversational chain (ASR stub -> QA -> response) and see where each turn's "
        "time went.",
    )
    parser.add_argument("-p", "--passage", nargs="*", default=[], help="passage text (several are joined)")
    parser.add_argument("-pf", "--passage-file", type=Path, help="file with the passage (UTF-8)")
    parser.add_argument("--turns-file", type=Path, help="one user turn per line (a .wav line is a spoken turn)")
    parser.add_argument("--target", metavar="HOST:PORT", help="a running qa-pipeline (default: start one here)")
    parser.add_argument("--engine", type=Path, help="QA engine for the in-process chain (default: the shipped one)")
    parser.add_argument("--budgets", default="", metavar="STAGE=DURATION,...", help="e.g. qa=10ms,turn=150ms")
    parser.add_argument("--allow-null", action="store_true", help="the model may answer that there is no answer")
    parser.add_argument("--audio-out", type=Path, help="ask for spoken replies and save them here as WAV files")
    parser.add_argument("--interim", action="store_true", help="show interim transcripts of spoken turns")
    parser.add_argument("--json", action="store_true", help="exactly one JSON object per turn on stdout")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="longest wait for one turn's events")
    parser.add_argument("--log-level", default="WARNING", help="logging level of an in-process chain")
    return parser


class UsageError(Exception):
    """A bad argument or input file: one line, exit 2."""


def read_passage(args: argparse.Namespace) -> str:
    if args.passage and args.passage_file:
        raise UsageError("give the passage with -p or -pf, not both")
    if args.passage_file:
        passage = read_utf8(args.passage_file, "passage")
    elif args.passage:
        passage = " ".join(args.passage)
    else:
        raise UsageError("no passage: give -p TEXT or -pf FILE")
    if not passage.strip():
        raise UsageError("the passage is empty")
    return passage


def parse_turn(line: str, base: Path) -> Turn | None:
    """A typed turn, a spoken turn (a .wav path), or None for blank lines and # comments."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if text.lower().endswith(".wav"):
        wav = Path(text) if Path(text).is_absolute() else base / text
        if not wav.is_file():
            raise UsageError(f"spoken turn {text}: no such WAV file {wav}")
        sidecar = wav.with_suffix(".txt")
        transcript = read_utf8(sidecar, "transcript").strip() if sidecar.is_file() else ""
        if not transcript:
            warning = f"qa-assistant converse: warning: {wav} has no {sidecar.name}: the ASR stub will fail that turn"
            print(warning, file=sys.stderr)
        return Turn(wav=wav, stub_transcript=transcript)
    return Turn(text=text)


def turns_from_file(path: Path) -> list[Turn]:
    lines = read_utf8(path, "turns").splitlines()
    turns = [turn for line in lines if (turn := parse_turn(line, path.parent)) is not None]
    if not turns:
        raise UsageError(f"turns file {path} has no turns")
    return turns


def prompted_turns(stream: TextIO) -> Iterator[Turn]:
    while True:
        print("You: ", end="", flush=True, file=sys.stderr)
        line = stream.readline()
        if not line or line.strip().lower() in QUIT_WORDS:
            return
        try:
            turn = parse_turn(line, Path.cwd())
        except (UsageError, InvalidInputError) as exc:
            print(f"qa-assistant converse: {exc}", file=sys.stderr)
            continue
        if turn is not None:
            yield turn


def turn_requests(turn: Turn) -> Iterator[assistant_pb2.ConverseRequest]:
    if turn.text is not None:
        yield assistant_pb2.ConverseRequest(text=assistant_pb2.TextTurn(text=turn.text))
        return
    assert turn.wav is not None
    audio = read_bytes(turn.wav, "WAV", MAX_WAV_BYTES)
    for offset in range(0, len(audio), CHUNK_BYTES):
        chunk = assistant_pb2.AudioChunk(content=audio[offset : offset + CHUNK_BYTES])
        if offset == 0:
            chunk.stub_transcript = turn.stub_transcript
        yield assistant_pb2.ConverseRequest(audio=chunk)
    end = assistant_pb2.EndOfUtterance(stub_transcript=turn.stub_transcript)
    yield assistant_pb2.ConverseRequest(end_of_utterance=end)


# -- output ------------------------------------------------------------------------------------------


def use_colour(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def format_turn(outcome: TurnOutcome, colour: bool) -> str:
    def paint(text: str, code: str) -> str:
        return f"{code}{text}{RESET}" if colour else text

    lines = [f"[turn {outcome.turn}] {outcome.trace_id}"]
    if outcome.interim:
        lines.append("  (hearing) " + " | ".join(outcome.interim))
    lines.append(f"  You said:  {outcome.transcript or '(no transcript)'}")
    answer = outcome.answer
    if answer is not None:
        found = "(no answer in the passage)" if answer.abstained else f"{answer.text!r}"
        detail = "" if answer.abstained else f"  (score {answer.score:.3f}, code points {answer.start}-{answer.end})"
        lines.append(f"  Answer:    {found}{detail}")
    if outcome.reply is not None:
        audio = response_pb2.AudioStatus.Name(outcome.reply.audio_status)
        lines.append(f"  Assistant: {outcome.reply.text}  [{audio}]")
    for error in outcome.errors:
        name = grpc.StatusCode(_code(error.code)).name
        lines.append(paint(f"  Error in {error.stage}: {name}: {error.message}", RED))
    report = outcome.report
    if report is not None:
        lines.append(f"  {'stage':<18}{'start ms':>9}{'took ms':>10}{'budget ms':>11}")
        for span in report.spans:
            name = ("  " if span.parent else "") + span.name
            budget = f"{span.budget_ns / MS:>11.2f}" if span.budget_ns is not None else f"{'':>11}"
            row = f"  {name:<18}{span.start_ns / MS:>9.2f}{span.duration_ns / MS:>10.2f}{budget}"
            if span.budget_ns is not None:
                row = paint(row + ("  OVER" if span.over_budget else "  ok"), RED if span.over_budget else GREEN)
            elif span.parent:
                row = paint(row, DIM)
            lines.append(row)
        total = f"  {'turn total':<18}{'':>9}{report.total_ns / MS:>10.2f}{report.turn_budget_ns / MS:>11.2f}"
        over = report.total_ns > report.turn_budget_ns
        lines.append(paint(total + ("  OVER" if over else "  ok"), RED if over else GREEN))
        hand_offs = f"  {'(hand-offs)':<18}{'':>9}{report.unattributed_ns / MS:>10.2f}"
        lines.append(paint(hand_offs, YELLOW))
    return "\n".join(lines) + "\n"


# -- the session -------------------------------------------------------------------------------------


class Session:
    """One assistant.v1 Converse call driven turn by turn."""

    def __init__(self, call: Any, timeout_s: float) -> None:
        self.call = call
        self.timeout_s = timeout_s

    async def start(self, config: assistant_pb2.SessionConfig) -> assistant_pb2.ConverseEvent:
        await self.call.write(assistant_pb2.ConverseRequest(config=config))
        event = await self._read()
        if event is None or event.WhichOneof("event") != "started":
            raise RuntimeError("the assistant did not start the session")
        return event

    async def turn(self, turn: Turn) -> TurnOutcome:
        for request in turn_requests(turn):
            await self.call.write(request)
        outcome = TurnOutcome()
        while True:
            event = await self._read()
            if event is None:
                raise RuntimeError("the assistant ended the session in the middle of a turn")
            kind = event.WhichOneof("event")
            outcome.turn, outcome.trace_id = event.turn, event.trace_id
            if kind == "transcript":
                if event.transcript.is_final:
                    outcome.transcript = event.transcript.text
                elif event.transcript.text:
                    outcome.interim.append(event.transcript.text)
            elif kind == "answer":
                outcome.answer = event.answer
            elif kind == "reply":
                outcome.reply = event.reply
            elif kind == "error":
                outcome.errors.append(event.error)
            elif kind == "report":
                outcome.report = report_from_pb(event.turn, event.trace_id, event.report)
                return outcome

    async def _read(self) -> assistant_pb2.ConverseEvent | None:
        async with asyncio.timeout(self.timeout_s):
            event = await self.call.read()
        return None if event is grpc.aio.EOF else event

    async def close(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.call.done_writing()
        self.call.cancel()


@contextlib.asynccontextmanager
async def chain_target(args: argparse.Namespace) -> AsyncIterator[str]:
    """The assistant.v1 address: --target, or a chain started in this process for the session."""
    if args.target:
        yield args.target
        return
    from realtime_qa.pipeline.launcher import ChainConfig, start_chain

    config = ChainConfig(engine_dir=args.engine, assistant_port=0, dashboard_port=None)
    async with start_chain(config) as chain:
        yield chain.assistant_target


async def converse(args: argparse.Namespace, passage: str, turns: Sequence[Turn] | Iterator[Turn]) -> int:
    budgets = parse_budgets(args.budgets) if args.budgets else None
    config = assistant_pb2.SessionConfig(
        passage=passage, want_audio=args.audio_out is not None, interim_results=args.interim
    )
    config.qa_options.allow_null = args.allow_null
    if budgets is not None:
        for name, value in budgets.as_ms().items():
            config.budgets_ms[name] = value
    colour = use_colour(sys.stdout)
    async with chain_target(args) as target, grpc.aio.insecure_channel(target) as channel:
        stub = assistant_pb2_grpc.AssistantStub(channel)
        call = stub.Converse(metadata=((TRACE_ID_HEADER, f"converse-{uuid.uuid4().hex[:8]}"),))
        session = Session(call, args.timeout_s)
        try:
            await session.start(config)
            for turn in turns:
                outcome = await session.turn(turn)
                if args.audio_out is not None and outcome.reply is not None and outcome.reply.audio:
                    args.audio_out.mkdir(parents=True, exist_ok=True)
                    (args.audio_out / f"turn-{outcome.turn}.wav").write_bytes(outcome.reply.audio)
                if args.json:
                    print(json.dumps(outcome.as_dict(), ensure_ascii=False), flush=True)
                else:
                    print(format_turn(outcome, colour), flush=True)
        finally:
            await session.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return EXIT_BAD_INPUT if exc.code else 0
    level = args.log_level.upper()
    logging.basicConfig(level=level if isinstance(logging.getLevelName(level), int) else "WARNING")
    try:
        passage = read_passage(args)
        if args.budgets:
            try:
                parse_budgets(args.budgets)
            except ValueError as exc:
                raise UsageError(f"--budgets: {exc}") from None
        if args.timeout_s <= 0:
            raise UsageError("--timeout-s must be positive")
        if args.target is not None and args.engine is not None:
            raise UsageError("--engine starts a chain here; it cannot go with --target")
        turns: Sequence[Turn] | Iterator[Turn] = (
            turns_from_file(args.turns_file) if args.turns_file else prompted_turns(sys.stdin)
        )
        return asyncio.run(converse(args, passage, turns))
    except (UsageError, InvalidInputError) as exc:
        print(f"qa-assistant converse: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        print(f"qa-assistant converse: error: {code.name}: {exc.details()}", file=sys.stderr)
        return EXIT_BAD_INPUT if code is grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILURE
    except (TimeoutError, RuntimeError, OSError, QAError) as exc:
        print(f"qa-assistant converse: error: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
