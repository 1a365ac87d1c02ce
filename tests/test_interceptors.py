"""The standard interceptor chain: request ids, error mapping, metrics, drain refusal and message decoding.

The first tests run a tiny servicer of generic handlers behind `server_interceptors` (no engine), the
last ones send raw bytes and hostile ids to a real `qa.v1` server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.errors import InvalidRequestError
from realtime_qa.services.interceptors import CallTracker, InvalidMessage, server_interceptors
from realtime_qa.services.logctx import LOG_FORMAT, RequestIdFilter, escape_log_text
from realtime_qa.services.server import QAServer

from realtime_qa.qa.v1 import qa_pb2, qa_pb2_grpc

Code = grpc.StatusCode
PASSAGE = "The Normans gave their name to Normandy, a region in France. Their leader was Rollo."
ECHO = "test.Echo"


class Counts:
    """A real Prometheus counter behind the `count_request` protocol."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("requests", "calls", ["method", "code"], registry=self.registry)

    def count_request(self, method: str, code_name: str) -> None:
        self.requests.labels(method, code_name).inc()

    def value(self, method: str, code: str) -> float:
        return self.registry.get_sample_value("requests_total", {"method": method, "code": code}) or 0.0


class LogLines(logging.Handler):
    """Formats records exactly as qa-serve does (request id included) and keeps the lines."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.addFilter(RequestIdFilter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(self.format(record).split("\n"))


@pytest.fixture
def log_lines() -> AsyncIterator[LogLines] | Any:
    handler = LogLines()
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


async def echo_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    text = request.decode()
    if text == "invalid":
        raise InvalidRequestError("bad input")
    if text == "crash":
        raise RuntimeError("secret internals")
    if text == "wait":
        await asyncio.sleep(0.3)
    logging.getLogger("echo").info("echo %s", text)
    return request


async def echo_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        if request == b"crash":
            raise RuntimeError("secret internals in a stream")
        yield request


def echo_handler() -> grpc.GenericRpcHandler:
    same = bytes  # identity (de)serializers: the request bytes are the message
    return grpc.method_handlers_generic_handler(
        ECHO,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(echo_unary, same, same),
            "Stream": grpc.stream_stream_rpc_method_handler(echo_stream, same, same),
        },
    )


@pytest.fixture
async def echo() -> AsyncIterator[tuple[str, Counts, CallTracker]]:
    counts, calls = Counts(), CallTracker()
    server = grpc.aio.server(interceptors=server_interceptors(counts, calls=calls, max_message_bytes=1024))
    server.add_generic_rpc_handlers((echo_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", counts, calls
    await server.stop(0)


def unary(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(f"/{ECHO}/Unary")


async def test_expected_and_unexpected_failures_get_their_status_and_are_counted(
    echo: tuple[str, Counts, CallTracker], log_lines: LogLines
) -> None:
    target, counts, _ = echo
    async with grpc.aio.insecure_channel(target) as channel:
        assert await unary(channel)(b"hello") == b"hello"
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await unary(channel)(b"invalid")
        with pytest.raises(grpc.aio.AioRpcError) as crash:
            await unary(channel)(b"crash")
        with pytest.raises(grpc.aio.AioRpcError) as oversize:
            await unary(channel)(b"x" * 2000)
    assert (invalid.value.code(), invalid.value.details()) == (Code.INVALID_ARGUMENT, "bad input")
    assert crash.value.code() == Code.INTERNAL and "secret" not in (crash.value.details() or "")
    assert oversize.value.code() == Code.INVALID_ARGUMENT and "exceeds the limit of 1,024" in str(oversize.value)
    assert counts.value("Unary", "OK") == 1
    assert counts.value("Unary", "INVALID_ARGUMENT") == 2
    assert counts.value("Unary", "INTERNAL") == 1
    text = "\n".join(log_lines.lines)
    assert "Traceback" in text and "secret internals" in text  # the unexpected one, in the server log only
    assert text.count("Traceback") == 1  # expected failures are one line each


async def test_unexpected_failure_inside_a_stream_is_internal_not_unknown(
    echo: tuple[str, Counts, CallTracker],
) -> None:
    target, counts, _ = echo
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(f"/{ECHO}/Stream")()
        await call.write(b"one")
        assert await call.read() == b"one"
        await call.write(b"crash")
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call.read()
    assert failed.value.code() == Code.INTERNAL
    assert "secret" not in (failed.value.details() or "")
    assert counts.value("Stream", "INTERNAL") == 1


async def test_request_id_is_returned_and_in_every_log_line_escaped(
    echo: tuple[str, Counts, CallTracker], log_lines: LogLines
) -> None:
    target, _, _ = echo
    async with grpc.aio.insecure_channel(target) as channel:
        call = unary(channel)(b"logged", metadata=(("x-request-id", "abc-123"),))
        await call
        assert ("x-request-id", "abc-123") in tuple(await call.trailing_metadata())
        made_up = unary(channel)(b"anonymous")
        await made_up
        assert any(key == "x-request-id" and value for key, value in await made_up.trailing_metadata())
    assert any("[abc-123] echo logged" in line for line in log_lines.lines)


def test_user_text_in_logs_cannot_forge_lines() -> None:
    forged = "req\n2026-01-01 00:00:00 ERROR forged line \x1b[31mred"
    escaped = escape_log_text(forged)
    assert "\n" not in escaped and "\x1b" not in escaped
    assert "\\n" in escaped and "\\x1b" in escaped
    assert escape_log_text("x" * 1_000_000).endswith("...(1,000,000 chars)")
    assert len(escape_log_text("x" * 1_000_000)) < 250


async def test_draining_refuses_new_calls_and_waits_for_calls_in_flight(
    echo: tuple[str, Counts, CallTracker],
) -> None:
    target, _, calls = echo
    async with grpc.aio.insecure_channel(target) as channel:
        in_flight = asyncio.ensure_future(unary(channel)(b"wait"))
        async with asyncio.timeout(10):
            while calls.in_flight == 0:
                await asyncio.sleep(0.001)
        calls.drain()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await unary(channel)(b"late")
        assert await calls.wait_idle(10)
        assert await in_flight == b"wait"
    assert refused.value.code() == Code.UNAVAILABLE and "shutting down" in (refused.value.details() or "")


# -- a real qa.v1 server -------------------------------------------------------------------------------


@pytest.fixture
async def qa_server(engine_dir: Path) -> AsyncIterator[QAServer]:
    config = ServerConfig(port=0, engines=(EngineSpec(engine_dir),), grace_s=5.0, max_message_bytes=64 * 1024)
    async with QAServer(config) as server:
        yield server


async def raw_answer(target: str, payload: bytes) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary("/qa.v1.QuestionAnswering/Answer")  # bytes in, bytes out
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call(payload)
    return failed.value


def invalid_utf8_request() -> bytes:
    """An AnswerRequest whose question is cut inside a character (what a JS client's slice() can produce)."""
    valid = qa_pb2.AnswerRequest(question="Who led them, 🙂?", passage=PASSAGE).SerializeToString()
    smile = "🙂".encode()
    return valid.replace(smile, smile[:2] + b"??")


async def test_malformed_protobuf_is_invalid_argument_without_a_traceback(
    qa_server: QAServer, log_lines: LogLines
) -> None:
    garbage = await raw_answer(qa_server.target, b"\xff\xff\xff\xff garbage")
    broken_text = await raw_answer(qa_server.target, invalid_utf8_request())
    assert garbage.code() == Code.INVALID_ARGUMENT
    assert garbage.details() == "malformed request message: not a valid protobuf message of this method's request type"
    assert broken_text.code() == Code.INVALID_ARGUMENT
    assert broken_text.details() == "malformed request message: a string field is not valid UTF-8"
    assert "Traceback" not in "\n".join(log_lines.lines)
    assert "DecodeError" not in (garbage.details() or "") + (broken_text.details() or "")


async def test_one_bad_message_on_a_stream_does_not_end_it(qa_server: QAServer) -> None:
    good = qa_pb2.AnswerRequest(request_id="good", question="Who was the leader?", passage=PASSAGE)
    oversize = qa_pb2.AnswerRequest(request_id="big", question="Who?", passage="x " * 40_000)  # 80 kB > 64 kB
    async with grpc.aio.insecure_channel(qa_server.target) as channel:
        call = channel.stream_stream(
            "/qa.v1.QuestionAnswering/AnswerStream", response_deserializer=qa_pb2.AnswerResponse.FromString
        )()
        for payload in (b"\xff\xff garbage", invalid_utf8_request(), oversize.SerializeToString()):
            await call.write(payload)
        await call.write(good.SerializeToString())
        await call.done_writing()
        responses = [response async for response in call]
        assert await call.code() == Code.OK
    errors = [response.error for response in responses if response.HasField("error")]
    answers = [response for response in responses if not response.HasField("error")]
    assert len(errors) == 3 and {error.code for error in errors} == {Code.INVALID_ARGUMENT.value[0]}
    assert any("exceeds the limit of 65,536" in error.message for error in errors)
    assert [answer.request_id for answer in answers] == ["good"] and answers[0].answer.text


async def test_hostile_stream_tags_cannot_forge_log_lines(qa_server: QAServer, log_lines: LogLines) -> None:
    tag = "t\n2026-01-01 00:00:00,000 ERROR forged [x] \x1b[31mowned"
    request = qa_pb2.AnswerRequest(request_id=tag, question="", passage=PASSAGE)  # fails: logged with its tag
    async with grpc.aio.insecure_channel(qa_server.target) as channel:
        stub = qa_pb2_grpc.QuestionAnsweringStub(channel)
        responses = [response async for response in stub.AnswerStream(iter([request]))]
    assert responses[0].error.code == Code.INVALID_ARGUMENT.value[0]
    assert responses[0].request_id == tag  # echoed to the client untouched
    failures = [line for line in log_lines.lines if "stream question failed" in line]
    assert failures and all("\\n2026-01-01" in line and "\\x1b[31m" in line for line in failures)
    assert not any(line.startswith("2026-01-01 00:00:00,000 ERROR forged") for line in log_lines.lines)


def test_invalid_message_marker_carries_a_plain_message() -> None:
    assert InvalidMessage("malformed request message").message == "malformed request message"
