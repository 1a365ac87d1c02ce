"""The typed asyncio client: conversions at the boundary, retries with backoff inside a deadline, streams, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from realtime_qa.pipeline.client import (
    Answer,
    AnswerFailure,
    AnswerOptions,
    ClientConfig,
    QAClient,
    QAClientError,
    Question,
    RetryPolicy,
    channel_target,
    result_from_pb,
    status_code_of,
)
from realtime_qa.qacore.decoding import Span
from realtime_qa.qacore.latency import StageTimings
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.server import QAServer

from realtime_qa.qa.v1 import qa_pb2

PASSAGE = "The Normans gave their name to Normandy, a region in France. Their leader was Rollo."


@pytest.fixture
async def server(engine_dir: Path) -> AsyncIterator[QAServer]:
    async with QAServer(ServerConfig(port=0, engines=(EngineSpec(engine_dir),))) as server:
        yield server


def answer_calls(server: QAServer, code: str) -> float:
    value = server.metrics.registry.get_sample_value("qa_requests_total", {"method": "Answer", "code": code})
    return value or 0.0


def test_options_send_only_what_is_set() -> None:
    unset = AnswerOptions().to_pb()
    assert not unset.HasField("n_best_size") and not unset.HasField("timeout_ms") and not unset.allow_null
    options = AnswerOptions(n_best_size=3, max_answer_length=7, allow_null=True, null_threshold=0.5, timeout_ms=9)
    message = options.to_pb()
    assert (message.n_best_size, message.max_answer_length, message.allow_null) == (3, 7, True)
    assert (message.null_threshold, message.timeout_ms) == (0.5, 9)
    assert Question("q", passage_id="p-1").to_pb().WhichOneof("passage_source") == "passage_id"
    assert Question("q", "text").to_pb().WhichOneof("passage_source") == "passage"


def test_responses_become_domain_objects() -> None:
    span = qa_pb2.Span(text="Rollo", start=78, end=83, score=0.75, logit=3.5)
    message = qa_pb2.AnswerResponse(
        request_id="7",
        answer=span,
        nbest=[span],
        model_id="m",
        engine="onnxruntime-fp32",
        passage_id="p-1",
        timings=qa_pb2.StageTimings(queue_ns=1, tokenize_ns=2, infer_ns=3, decode_ns=4, total_ns=11),
    )
    answer = result_from_pb(message)
    assert isinstance(answer, Answer)
    assert answer.best == Span("Rollo", 78, 83, 0.75, 3.5) and answer.text == "Rollo"
    assert answer.timings == StageTimings(1, 2, 3, 4, 11)
    abstained = Answer.from_pb(qa_pb2.AnswerResponse(abstained=True))
    assert abstained.best is None and abstained.text == "" and abstained.abstained
    failure = result_from_pb(qa_pb2.AnswerResponse(request_id="8", error=qa_pb2.Error(code=5, message="gone")))
    assert failure == AnswerFailure("8", grpc.StatusCode.NOT_FOUND, "gone")
    assert status_code_of(999) == grpc.StatusCode.UNKNOWN


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2.0)
    for attempt, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (10, 0.5)):
        samples = [policy.backoff_s(attempt) for _ in range(200)]
        assert all(0.0 <= sample <= ceiling for sample in samples)
        assert max(samples) > ceiling / 2  # full jitter spreads over the whole range


async def test_unavailable_is_retried_until_the_deadline(engine_dir: Path) -> None:
    server = QAServer(ServerConfig(port=0, engines=(EngineSpec(engine_dir),)))
    await server.listen()  # never loads a model: every call is UNAVAILABLE
    try:
        config = ClientConfig(retry=RetryPolicy(max_attempts=1000, initial_backoff_s=0.01, max_backoff_s=0.05))
        async with QAClient(server.target, config) as client:
            with pytest.raises(QAClientError) as failure:
                await client.answer("Who led them?", PASSAGE, timeout_s=0.5)
        assert failure.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        assert answer_calls(server, "UNAVAILABLE") >= 3
    finally:
        await server.stop()


async def test_retries_stop_after_max_attempts(engine_dir: Path) -> None:
    server = QAServer(ServerConfig(port=0, engines=(EngineSpec(engine_dir),)))
    await server.listen()
    try:
        config = ClientConfig(retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.001))
        async with QAClient(server.target, config) as client:
            with pytest.raises(QAClientError) as failure:
                await client.answer("Who led them?", PASSAGE)
        assert failure.value.code == grpc.StatusCode.UNAVAILABLE
        assert answer_calls(server, "UNAVAILABLE") == 3
    finally:
        await server.stop()


async def test_other_errors_are_not_retried(server: QAServer) -> None:
    async with QAClient(server.target, ClientConfig(retry=RetryPolicy(max_attempts=5))) as client:
        with pytest.raises(QAClientError) as failure:
            await client.answer("", PASSAGE, request_id="no-retry")
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.request_id == "no-retry"
    assert answer_calls(server, "INVALID_ARGUMENT") == 1


async def test_wait_ready_and_health(server: QAServer) -> None:
    async with QAClient(server.target) as client:
        await client.wait_ready(10)
        assert await client.health() == "SERVING"
        with pytest.raises(QAClientError) as unknown:
            await client.health("no.such.Service")
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND


async def test_leaving_a_stream_early_cancels_it_on_the_server(server: QAServer) -> None:
    questions = [Question(f"Who led them ({index})?", " ".join([PASSAGE] * 60)) for index in range(6)]
    async with QAClient(server.target) as client:
        async for result in client.answer_stream(questions):
            assert isinstance(result, Answer)
            break
        for _ in range(500):
            if not server.service.streams:
                break
            await asyncio.sleep(0.01)
    assert not server.service.streams


async def test_answer_stream_takes_an_async_iterable(server: QAServer) -> None:
    async def questions() -> AsyncIterator[Question]:
        for index in range(3):
            await asyncio.sleep(0.01)
            yield Question(f"Who led them ({index})?", PASSAGE, request_id=f"q{index}")

    async with QAClient(server.target) as client:
        results = [result async for result in client.answer_stream(questions(), timeout_s=30)]
    assert sorted(result.request_id for result in results) == ["q0", "q1", "q2"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_tls(engine_dir: Path, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    config = ServerConfig(port=0, engines=(EngineSpec(engine_dir),), tls_cert=cert, tls_key=key)
    async with QAServer(config) as server:
        async with QAClient(server.target, ClientConfig(tls_root_cert=cert)) as client:
            assert (await client.answer("Who led them?", PASSAGE)).text
        plaintext = ClientConfig(retry=RetryPolicy(max_attempts=1), timeout_s=2)
        async with QAClient(server.target, plaintext) as client:
            with pytest.raises(QAClientError):
                await client.answer("Who led them?", PASSAGE)


def test_several_addresses_become_one_balanced_target() -> None:
    assert channel_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert channel_target("dns:///qa.internal:50051") == "dns:///qa.internal:50051"
    assert channel_target("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert channel_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    for bad in ("", "qa-a:1,qa-b:2", "127.0.0.1:1,[::1]:2", "127.0.0.1,127.0.0.2:2"):
        with pytest.raises(ValueError):
            channel_target(bad)


def test_the_service_config_asks_grpc_for_round_robin_retries_and_throttling() -> None:
    import json

    config = json.loads(RetryPolicy(max_attempts=9, initial_backoff_s=0.05).service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert {name["method"] for name in method["name"]} == {"Answer", "PutPassage", "ListModels", "GetModelInfo"}
    assert method["retryPolicy"]["maxAttempts"] == 5  # gRPC's own limit
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert config["retryThrottling"]["maxTokens"] > 0
    assert "methodConfig" not in json.loads(RetryPolicy(max_attempts=1).service_config())
    tiny = json.loads(RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.001).service_config())
    assert tiny["methodConfig"][0]["retryPolicy"]["initialBackoff"] == "0.010s"  # grpc/grpc#41036: ~1 ms hangs
    with pytest.raises(ValueError, match="both"):
        ClientConfig(tls_root_cert=Path("ca.pem"), tls_client_cert=Path("c.pem"))
    assert "secret" not in repr(ClientConfig(token="secret"))  # tokens are never printed


async def test_round_robin_spreads_calls_and_routes_around_a_stopped_server(engine_dir: Path) -> None:
    servers = [QAServer(ServerConfig(port=0, engines=(EngineSpec(engine_dir),))) for _ in range(2)]
    for server in servers:
        await server.start()
    try:
        async with QAClient([server.target for server in servers]) as client:
            for index in range(10):
                assert (await client.answer(f"Who led them ({index})?", PASSAGE)).text
            assert all(answer_calls(server, "OK") >= 2 for server in servers)  # both addresses got calls
            await servers[0].stop()
            for index in range(6):  # gRPC retries UNAVAILABLE and round_robin drops the dead address
                assert (await client.answer(f"Who led them ({index})?", PASSAGE)).text
    finally:
        for server in servers:
            await server.stop()


@pytest.mark.parametrize(("own_connection", "connections"), [(False, 1), (True, 3)])
async def test_own_connection_gives_each_client_its_tcp_connection(own_connection: bool, connections: int) -> None:
    """gRPC shares one connection among a process's channels to a target; `qa-serve --workers` (SO_REUSEPORT)
    spreads connections, so only clients with `own_connection` reach several workers. The server sees which
    connection (client port) each health check came on."""
    peers: list[str] = []
    async with health_server_recording(peers) as target:
        clients = [QAClient(target, ClientConfig(own_connection=own_connection)) for _ in range(3)]
        for client in clients:
            assert await client.health() == "SERVING"
        for client in clients:
            await client.close()
    assert len(peers) == 3 and len(set(peers)) == connections


@contextlib.asynccontextmanager
async def health_server_recording(peers: list[str]) -> AsyncIterator[str]:
    """A bare gRPC server whose health check answers SERVING and appends the caller's peer (its client port) to
    `peers`; yields its target."""
    from grpc_health.v1 import health_pb2

    async def check(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        peers.append(context.peer())
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_connections_open_that_many_tcp_connections_and_wait_ready_checks_each() -> None:
    """`ClientConfig(connections=3)`: three connections of its own (the server sees three client ports), each one
    checked by wait_ready (with `qa-serve --workers` each may reach another worker)."""
    peers: list[str] = []
    async with health_server_recording(peers) as target, QAClient(target, ClientConfig(connections=3)) as client:
        await client.wait_ready(10)
    assert len(peers) == 3 and len(set(peers)) == 3


async def test_calls_and_streams_go_on_the_connection_with_the_fewest_in_flight(server: QAServer) -> None:
    async with QAClient(server.target, ClientConfig(connections=3)) as client:
        calls = [asyncio.create_task(client.answer(f"Who led them ({index})?", PASSAGE)) for index in range(6)]
        await asyncio.sleep(0)  # every task has sent its call (none can be answered before the loop turns again)
        assert client.in_flight == [2, 2, 2]
        assert all(answer.text for answer in await asyncio.gather(*calls))
        assert client.in_flight == [0, 0, 0]
        client.in_flight[1] += 5  # as if connection 1 were slow to answer: the next calls avoid it
        calls = [asyncio.create_task(client.answer(f"Who led them ({index})?", PASSAGE)) for index in range(4)]
        await asyncio.sleep(0)
        assert client.in_flight == [2, 5, 2]
        await asyncio.gather(*calls)
        client.in_flight[1] -= 5
        streams = [client.open_stream(timeout_s=30) for _ in range(3)]
        assert client.in_flight == [1, 1, 1]  # an open stream counts until it ends
        for stream in streams:
            await stream.send(Question("Who led them?", PASSAGE, request_id="q"))
            await stream.done_sending()
            assert isinstance(await stream.receive(), Answer)
            assert await stream.receive() is None
        for _ in range(500):
            if client.in_flight == [0, 0, 0]:
                break
            await asyncio.sleep(0.01)
        assert client.in_flight == [0, 0, 0]


@pytest.mark.parametrize("connections", [0, 65])
def test_connections_outside_1_to_64_are_refused(connections: int) -> None:
    with pytest.raises(ValueError, match=r"connections must be 1\.\.64"):
        ClientConfig(connections=connections)
