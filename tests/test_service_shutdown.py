"""Graceful shutdown: SIGTERM on a real `qa-serve` process under load, and streams open at shutdown."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from realtime_qa.pipeline.client import Answer, ClientConfig, QAClient, QAClientError, Question, RetryPolicy
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.server import QAServer
from waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
PASSAGE = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway."
)
NO_RETRY = ClientConfig(retry=RetryPolicy(max_attempts=1), timeout_s=60)
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def qa_serve_command() -> list[str]:
    """The installed console script, or the same entry point through the interpreter (uninstalled checkout)."""
    script = Path(sys.executable).parent / "qa-serve"
    return (
        [str(script)]
        if script.is_file()
        else [sys.executable, "-c", "import sys, realtime_qa.services.cli as cli; sys.exit(cli.main())"]
    )


class ServerProcess:
    """`qa-serve --port 0` in a subprocess; its log is collected while it runs."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str) -> ServerProcess:
        process = await asyncio.create_subprocess_exec(
            *qa_serve_command(), *args, cwd=REPO, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            match = LISTENING.search(line)
            if match and not self.port.done():
                self.port.set_result(int(match.group(1)))
        if not self.port.done():
            self.port.set_exception(RuntimeError("qa-serve exited before listening:\n" + "\n".join(self.lines)))

    async def wait(self, timeout_s: float) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        await self._reader
        return code

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


@pytest.mark.slow
async def test_sigterm_under_load_loses_no_accepted_request(engine_dir: Path) -> None:
    server = await ServerProcess.start("--port", "0", "--engine", str(engine_dir), "--grace-s", "30")
    try:
        port = await asyncio.wait_for(server.port, 120)
        target = f"127.0.0.1:{port}"
        async with QAClient(target, NO_RETRY) as client:
            await client.wait_ready(120)
            outcomes: list[tuple[float, float, Answer | QAClientError]] = []

            async def closed_loop(worker: int) -> None:
                # Each worker asks until the server refuses it (after SIGTERM).
                for index in range(10_000):
                    started = time.monotonic()
                    try:
                        result: Answer | QAClientError = await client.answer(
                            f"Who were the Normans ({worker}/{index})?", PASSAGE
                        )
                    except QAClientError as exc:
                        result = exc
                    outcomes.append((started, time.monotonic(), result))
                    if isinstance(result, QAClientError):
                        return

            workers = [asyncio.create_task(closed_loop(worker)) for worker in range(16)]
            await wait_until(lambda: sum(isinstance(o[2], Answer) for o in outcomes) >= 40, 60, "40 answers")
            signal_time = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*workers), 60)
        code = await server.wait(60)
    finally:
        server.kill()
    log = "\n".join(server.lines)
    assert code == 0, log
    assert "signal received: shutting down" in log and "stopped after" in log
    answered = [(started, ended) for started, ended, result in outcomes if isinstance(result, Answer)]
    refused = [
        (started, ended, result.code) for started, ended, result in outcomes if isinstance(result, QAClientError)
    ]
    assert len(refused) == 16  # each worker stopped at its first refusal, none hung
    # Every request the server accepted was answered: none was cancelled or failed on the server...
    assert "cancelled" not in log.lower()
    assert "still in flight" not in log
    assert "INTERNAL" not in log
    # ...requests in flight when the signal arrived were answered during the grace period...
    assert any(started < signal_time < ended for started, ended in answered)
    # ...and only requests sent after the signal were refused: with UNAVAILABLE by the draining
    # service, or CANCELLED by gRPC for a call that arrived as the server closed its port.
    assert all(ended > signal_time for _, ended, _ in refused)
    assert {code for _, _, code in refused} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert any(code == grpc.StatusCode.UNAVAILABLE for _, _, code in refused)


async def test_shutdown_answers_what_a_stream_has_sent_then_ends_it_unavailable(engine_dir: Path) -> None:
    config = ServerConfig(port=0, engines=(EngineSpec(engine_dir),), grace_s=30.0)
    server = QAServer(config)
    await server.start()
    try:
        async with QAClient(server.target, NO_RETRY) as client:
            stream = client.open_stream(timeout_s=60)  # the reads below end by this deadline at the latest
            tags = [str(index) for index in range(6)]
            for tag in tags:
                await stream.send(Question(f"Who were the Normans ({tag})?", " ".join([PASSAGE] * 8), request_id=tag))
            # Wait (bounded) until the server has read every question of the stream.
            await wait_until(lambda: any(session.read == len(tags) for session in server.service.streams), 30)
            stopping = asyncio.create_task(server.stop())
            received = []
            with pytest.raises(QAClientError) as ended:
                while (result := await stream.receive()) is not None:
                    received.append(result)
            await stopping
    finally:
        await server.stop()
    assert ended.value.code == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in ended.value.message
    assert sorted(result.request_id for result in received) == tags
    assert all(isinstance(result, Answer) for result in received)


async def test_sigterm_answers_every_question_of_a_half_closed_stream(engine_dir: Path) -> None:
    """A client that sent its last question and waits (`answer_stream(list)`) gets every answer on SIGTERM,
    and the log counts the answers actually written."""
    server = await ServerProcess.start("--port", "0", "--engine", str(engine_dir), "--grace-s", "30")
    try:
        port = await asyncio.wait_for(server.port, 120)
        async with QAClient(f"127.0.0.1:{port}", NO_RETRY) as client:
            await client.wait_ready(120)
            questions = [
                Question(f"Who were the Normans ({index})?", " ".join([PASSAGE] * 6), request_id=str(index))
                for index in range(24)
            ]
            stream = client.open_stream(timeout_s=60)  # the reads below end by this deadline at the latest
            for question in questions:
                await stream.send(question)
            await stream.done_sending()
            first = await stream.receive()  # the server is answering: signal it now
            assert first is not None
            server.process.send_signal(signal.SIGTERM)
            received = [first]
            while (result := await stream.receive()) is not None:
                received.append(result)
        code = await server.wait(60)
    finally:
        server.kill()
    log = "\n".join(server.lines)
    assert code == 0, log
    assert sorted(int(result.request_id) for result in received) == list(range(24))
    assert all(isinstance(result, Answer) for result in received)
    assert "stream finished during shutdown: 24 answers written to 24 questions" in log, log


async def test_grace_period_bounds_the_shutdown(engine_dir: Path) -> None:
    """With --grace-s 1 and more queued work than a second can run, the process exits within about a second
    of SIGTERM: queued work is dropped (the callers get UNAVAILABLE), not run."""
    server = await ServerProcess.start(
        "--port", "0", "--engine", str(engine_dir), "--grace-s", "1", "--max-stream-questions", "64"
    )  # fmt: skip
    try:
        port = await asyncio.wait_for(server.port, 120)
        async with QAClient(f"127.0.0.1:{port}", NO_RETRY) as client:
            await client.wait_ready(120)
            stream = client.open_stream(timeout_s=60)  # the reads below end by this deadline at the latest
            for index in range(64):  # ~64 x 6 windows: many seconds of engine work on this machine
                await stream.send(Question(f"Who ({index})?", " ".join([PASSAGE] * 30), request_id=str(index)))
            first = await stream.receive()
            assert first is not None
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = await server.wait(60)
            exited_after_s = time.monotonic() - signalled
    finally:
        server.kill()
    assert code == 0, "\n".join(server.lines)
    # The grace period, the final close of idle connections (0.25 s) and at most one running engine call.
    assert exited_after_s < 3.0, (exited_after_s, "\n".join(server.lines))
