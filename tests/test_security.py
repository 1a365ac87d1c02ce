"""Authentication and transport security, end to end with a throwaway CA (openssl) and real servers on loopback.

One in-process server runs with everything on (TLS, mutual TLS, bearer tokens) and is probed the way a
user would; a `qa-serve` process shows that SIGHUP rotates the tokens. Logs of both are searched for
token and key material.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import pytest_asyncio
from deploy_support import Certificates, make_ca, start_replica, wait_for, wait_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from realtime_qa.pipeline.client import ClientConfig, QAClient, QAClientError, Question, RetryPolicy
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.server import QAServer

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command for the throwaway CA"
)
ON_THE_SHARED_SERVER = pytest.mark.asyncio(loop_scope="module")  # tests using the module's `secure` server

PASSAGE = "The Normans gave their name to Normandy, a region in France. Their leader was Rollo."
TOKENS = ("alpha-7f3c2d9e8b1a4c6f", "bravo-0a9b8c7d6e5f4a3b")
NO_RETRY = RetryPolicy(max_attempts=1)
T = TypeVar("T")


async def held_until(gate: asyncio.Event, message: T) -> AsyncIterator[T]:
    """A stream's one request, sent only once `gate` is set.

    A refused stream must have nothing in flight when the server aborts it: a client write racing the
    abort can end the call in INTERNAL instead of the server's status (grpc/grpc#36066).
    """
    await gate.wait()
    yield message


@dataclass
class SecureServer:
    server: QAServer
    certs: Certificates
    other: Certificates  # a second CA the server does not trust
    log_records: list[logging.LogRecord]

    def client(self, token: str | None = None, certs: Certificates | None = None, client_cert: bool = True) -> QAClient:
        certs = certs or self.certs
        config = ClientConfig(
            retry=NO_RETRY,
            timeout_s=30,
            tls_root_cert=self.certs.ca,  # always verify the real server
            tls_client_cert=certs.client_cert if client_cert else None,
            tls_client_key=certs.client_key if client_cert else None,
            token=token,
        )
        return QAClient(self.server.target, config)


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def secure(engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SecureServer]:
    directory = tmp_path_factory.mktemp("security")
    certs, other = make_ca(directory / "ca", "trusted"), make_ca(directory / "other", "untrusted")
    token_file = directory / "tokens"
    token_file.write_text(f"# clients\n{TOKENS[0]}\n\n{TOKENS[1]}\n", encoding="utf-8")
    records: list[logging.LogRecord] = []
    handler = _Collect(records)
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    config = ServerConfig(
        port=0,
        engines=(EngineSpec(engine_dir),),
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
        auth_token_file=token_file,
    )
    try:
        async with QAServer(config) as server:
            yield SecureServer(server, certs, other, records)
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)


@ON_THE_SHARED_SERVER
async def test_plaintext_to_a_tls_server_fails(secure: SecureServer) -> None:
    async with QAClient(secure.server.target, ClientConfig(retry=NO_RETRY, timeout_s=5, token=TOKENS[0])) as client:
        with pytest.raises(QAClientError) as failure:
            await client.answer("Who led them?", PASSAGE)
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE


@ON_THE_SHARED_SERVER
async def test_a_client_without_a_certificate_or_with_another_cas_is_refused(secure: SecureServer) -> None:
    for client in (secure.client(TOKENS[0], client_cert=False), secure.client(TOKENS[0], certs=secure.other)):
        async with client:
            with pytest.raises(QAClientError) as failure:
                await client.answer("Who led them?", PASSAGE, timeout_s=5)
        assert failure.value.code == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: no call is made


@ON_THE_SHARED_SERVER
async def test_no_token_or_a_wrong_token_is_unauthenticated_on_every_rpc_but_health(secure: SecureServer) -> None:
    for token in (None, "wrong-token", TOKENS[0] + "x"):
        async with secure.client(token) as client:
            calls = {
                "Answer": client.answer("Who led them?", PASSAGE),
                "PutPassage": client.put_passage(PASSAGE),
                "ListModels": client.list_models(),
                "GetModelInfo": client.model_info(),
            }
            for name, call in calls.items():
                with pytest.raises(QAClientError) as failure:
                    await call
                assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED, name
            answered = asyncio.Event()  # the stream's question waits for the server's answer (its refusal)
            with pytest.raises(QAClientError) as stream_failure:
                questions = held_until(answered, Question("Who led them?", PASSAGE))
                async for _ in client.answer_stream(questions, timeout_s=10):
                    pass
            answered.set()
            assert stream_failure.value.code == grpc.StatusCode.UNAUTHENTICATED
            reflection = reflection_pb2_grpc.ServerReflectionStub(client.channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            answered = asyncio.Event()
            with pytest.raises(grpc.aio.AioRpcError) as reflection_failure:
                async for _ in reflection.ServerReflectionInfo(held_until(answered, request), timeout=10):
                    pass
            answered.set()
            assert reflection_failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Health checks are exempt, so load balancers and orchestrators can probe without a token.
            health = health_pb2_grpc.HealthStub(client.channel)
            status = await health.Check(health_pb2.HealthCheckRequest(service="qa.v1.QuestionAnswering"), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING


@ON_THE_SHARED_SERVER
async def test_the_right_credentials_get_answers(secure: SecureServer) -> None:
    for token in TOKENS:
        async with secure.client(token) as client:
            answer = await client.answer("Who was the leader of the Normans?", PASSAGE)
            assert answer.text == "Rollo"
            assert (await client.list_models())[0].model_id


@ON_THE_SHARED_SERVER
async def test_passage_ids_are_scoped_to_the_caller(secure: SecureServer) -> None:
    async with secure.client(TOKENS[0]) as owner, secure.client(TOKENS[1]) as other:
        private = PASSAGE + " Only the owner's tenant stored this sentence."  # nobody else has sent this text
        stored = await owner.put_passage(private)
        assert (await owner.answer("Who was their leader?", passage_id=stored.passage_id)).text == "Rollo"
        with pytest.raises(QAClientError) as failure:
            await other.answer("Who was their leader?", passage_id=stored.passage_id)
        assert failure.value.code == grpc.StatusCode.NOT_FOUND  # no membership oracle across tenants


@ON_THE_SHARED_SERVER
async def test_logs_show_no_token_or_key_material(secure: SecureServer) -> None:
    assert secure.log_records, "the server logged nothing: the capture is broken"
    text = "\n".join(record.getMessage() for record in secure.log_records)
    assert "auth: refused a call" in text  # the refusals above were logged ...
    assert_no_secrets(text, secure.certs)  # ... without what was presented


def assert_no_secrets(text: str, certs: Certificates) -> None:
    for token in (*TOKENS, "wrong-token"):
        assert token not in text
    assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text
    for key_file in (certs.server_key, certs.client_key):
        body = "".join(key_file.read_text().splitlines()[1:-1])
        assert body[:40] not in text.replace("\n", "")


@pytest.mark.slow
async def test_sighup_reloads_the_token_file(engine_dir: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKENS[0] + "\n", encoding="utf-8")
    replica = start_replica("qa-tokens", tmp_path, engine_dir, "--auth-token-file", str(token_file))
    try:
        wait_serving([replica])
        target = f"127.0.0.1:{replica.port}"

        async def works(token: str) -> bool:
            async with QAClient(target, ClientConfig(retry=NO_RETRY, timeout_s=30, token=token)) as client:
                try:
                    await client.list_models()
                except QAClientError as exc:
                    assert exc.code == grpc.StatusCode.UNAUTHENTICATED
                    return False
                return True

        assert await works(TOKENS[0]) and not await works(TOKENS[1])
        token_file.write_text(TOKENS[1] + "\n", encoding="utf-8")
        replica.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: "bearer tokens reloaded" in replica.log_text(), 30, "the token reload")
        assert await works(TOKENS[1]) and not await works(TOKENS[0])
        # A broken file keeps the tokens in use.
        token_file.write_text("\n", encoding="utf-8")
        replica.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: "token reload failed" in replica.log_text(), 30, "the failed reload")
        assert await works(TOKENS[1])
    finally:
        replica.stop()
    log_text = replica.log_text()
    assert re.search(r"bearer tokens reloaded", log_text)
    for token in TOKENS:
        assert token not in log_text


@ON_THE_SHARED_SERVER
async def test_the_chain_servers_use_the_same_authentication(secure: SecureServer, tmp_path: Path) -> None:
    """A chain stage server (the response stage; the assistant.v1 front is built the same way by qa-pipeline's
    --tls-*/--auth-token-file flags) with mutual TLS and tokens from `ServerSecurity`."""
    from realtime_qa.services.auth import AuthInterceptor, ServerSecurity
    from realtime_qa.services.response_service import ReplyMaker, ResponderConfig, response_server

    from realtime_qa.response.v1 import response_pb2, response_pb2_grpc

    token_file = tmp_path / "tokens"
    token_file.write_text(TOKENS[0] + "\n", encoding="utf-8")
    certs = secure.certs
    security = ServerSecurity(certs.server_cert, certs.server_key, certs.ca, token_file)
    server = response_server(
        ReplyMaker(ResponderConfig(speech=False)), interceptors=(AuthInterceptor(security.tokens()),)
    )
    server.credentials = security.credentials()
    await server.start()
    try:
        request = response_pb2.RespondRequest(outcome=response_pb2.ANSWERED, question="Who?", answer="Rollo", score=0.9)
        for token, expected in ((None, grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.UNAUTHENTICATED)):
            async with QAClient(server.target, secure.client(token).config) as client:
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await response_pb2_grpc.ResponderStub(client.channel).Respond(request, timeout=10)
                assert failure.value.code() == expected
                health = health_pb2_grpc.HealthStub(client.channel)
                assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status == 1  # SERVING
        async with QAClient(server.target, secure.client(TOKENS[0]).config) as client:
            reply = await response_pb2_grpc.ResponderStub(client.channel).Respond(request, timeout=10)
            assert "Rollo" in reply.text
        async with QAClient(server.target, secure.client(TOKENS[0], certs=secure.other).config) as client:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await response_pb2_grpc.ResponderStub(client.channel).Respond(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # no certificate of the trusted CA
    finally:
        await server.stop()


def test_qa_pipeline_refuses_half_a_tls_setup_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from realtime_qa.pipeline.pipeline_cli import config_from_args

    for argv, message in (
        (["--tls-client-ca", str(tmp_path / "ca.pem")], "needs the server's own --tls-cert"),
        (["--auth-token-file", str(tmp_path / "missing")], "cannot read token file"),
    ):
        with pytest.raises(SystemExit) as exited:
            config_from_args(argv)
        assert exited.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert message in lines[-1] and lines[-1].startswith("qa-pipeline: error:")
