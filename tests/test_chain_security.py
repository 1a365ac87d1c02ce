"""The chain's calls carry the turn's trace id to QA, within the QA budget; a split chain's stage processes
demand the same TLS, client certificates and bearer tokens as its front (qa-pipeline's flags, end to end)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from deploy_support import make_ca
from realtime_qa.pipeline.client import ClientConfig, open_channel
from realtime_qa.pipeline.launcher import ChainConfig, start_chain
from realtime_qa.pipeline.pipeline_cli import config_from_args
from realtime_qa.qacore.latency import parse_budgets
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.server import QAServer

from realtime_qa.asr.v1 import asr_pb2, asr_pb2_grpc
from realtime_qa.assistant.v1 import assistant_pb2, assistant_pb2_grpc

PASSAGE = "The Normans gave their name to Normandy, a region in France. Their leader was Rollo."
QUESTION = "Who was the leader of the Normans?"
QA_BUDGET_S = 3.0
TOKEN = "chain-token-4e2a9c1b7d"
TIMEOUT_S = 60.0


class AnswerCallRecorder(grpc.aio.ServerInterceptor):
    """Records, for every qa.v1 Answer call the QA server runs, its metadata and the deadline left."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], float | None]] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.endswith("/Answer") or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        metadata = {key: value for key, value in details.invocation_metadata or () if isinstance(value, str)}

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.calls.append((metadata, context.time_remaining()))
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


async def one_turn(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> list[Any]:
    """Open a session, send one text turn, return its events up to the report."""
    call = assistant_pb2_grpc.AssistantStub(channel).Converse(metadata=metadata)
    config = assistant_pb2.SessionConfig(passage=PASSAGE, budgets_ms={"qa": QA_BUDGET_S * 1000, "turn": 10_000})
    await call.write(assistant_pb2.ConverseRequest(config=config))
    await call.write(assistant_pb2.ConverseRequest(text=assistant_pb2.TextTurn(text=QUESTION)))
    await call.done_writing()
    events = []
    async with asyncio.timeout(TIMEOUT_S):
        async for event in call:
            events.append(event)
    return events


async def status_of_an_unwritten_stream(call: Any) -> grpc.StatusCode:
    """The status a server ends a stream with before any request: this side sends nothing, only reads.

    A refused stream must have no write in flight when the server aborts it: a client write racing the
    abort can end the call in INTERNAL instead of the server's status (grpc/grpc#36066).
    """
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async with asyncio.timeout(TIMEOUT_S):
            async for _ in call:
                pass
    return failure.value.code()


def answers_of(events: list[Any]) -> list[str]:
    return [event.answer.text for event in events if event.WhichOneof("event") == "answer"]


@pytest.mark.asyncio
async def test_qa_sees_the_turns_trace_id_and_the_qa_budget_as_its_deadline(engine_dir: Path) -> None:
    recorder = AnswerCallRecorder()
    qa = QAServer(ServerConfig(port=0, engines=(EngineSpec(engine_dir),), grace_s=1.0))
    qa.extra_interceptors.append(recorder)
    async with qa:
        config = ChainConfig(qa_target=qa.target, assistant_port=0, dashboard_port=None, budgets=parse_budgets(""))
        async with start_chain(config) as chain, grpc.aio.insecure_channel(chain.assistant_target) as channel:
            events = await one_turn(channel, (("x-trace-id", "trace-check"),))
    assert answers_of(events) == ["Rollo"]
    (metadata, remaining_s), *_ = recorder.calls
    assert metadata["x-trace-id"] == "trace-check/1"
    assert metadata["x-request-id"] == "trace-check/1"
    # the call's deadline is the session's QA budget (not the client's 10 s default); gRPC's timeout header
    # rounds up a little on its way
    assert remaining_s is not None and 0.5 * QA_BUDGET_S < remaining_s <= QA_BUDGET_S + 0.05


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command for the throwaway CA")
@pytest.mark.asyncio
async def test_a_split_chain_with_tokens_and_mutual_tls_guards_the_front_and_every_stage(
    engine_dir: Path, tmp_path: Path
) -> None:
    certs = make_ca(tmp_path / "ca", "chain")
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# the chain and its clients\n{TOKEN}\n", encoding="utf-8")
    secure = ("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key))
    mutual = (*secure, "--tls-client-ca", str(certs.ca), "--auth-token-file", str(token_file))
    chain_cert = ("--stage-tls-client-cert", str(certs.client_cert), "--stage-tls-client-key", str(certs.client_key))
    argv = ["--split", "--engine", str(engine_dir), "--port", "0", "--no-dashboard", *mutual, *chain_cert]
    config, _ = config_from_args(argv)
    assert config.stage_security is not None and config.stage_client is not None
    assert config.stage_client.token == TOKEN and config.stage_client.tls_root_cert == certs.ca

    def client(token: str | None) -> ClientConfig:
        return ClientConfig(
            tls_root_cert=certs.ca, tls_client_cert=certs.client_cert, tls_client_key=certs.client_key, token=token
        )

    async with start_chain(config) as chain:
        front, front_auth = open_channel(chain.assistant_target, client(TOKEN))
        async with front:
            events = await one_turn(front, front_auth)
        assert answers_of(events) == ["Rollo"]
        assert not [event for event in events if event.WhichOneof("event") == "error"]

        tokenless, _ = open_channel(chain.assistant_target, client(None))
        async with tokenless:
            refused = assistant_pb2_grpc.AssistantStub(tokenless).Converse(timeout=TIMEOUT_S)
            assert await status_of_an_unwritten_stream(refused) == grpc.StatusCode.UNAUTHENTICATED

        # the stage processes demand the same: no token, no recognition; no TLS, no connection
        assert chain.asr_target is not None and chain.response_target is not None
        asr, _ = open_channel(chain.asr_target, client(None))
        async with asr:
            stage_refused = asr_pb2_grpc.RecognizerStub(asr).StreamingRecognize(timeout=TIMEOUT_S)
            assert await status_of_an_unwritten_stream(stage_refused) == grpc.StatusCode.UNAUTHENTICATED
        async with grpc.aio.insecure_channel(chain.response_target) as plaintext:
            request = asr_pb2.StreamingRecognizeRequest(config=asr_pb2.RecognitionConfig())
            call = asr_pb2_grpc.RecognizerStub(plaintext).StreamingRecognize(iter([request]), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as no_tls:
                async for _ in call:
                    pass
        assert no_tls.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--split", "--tls-client-ca", "CA"), "needs --stage-tls-client-cert"),
        (("--split", "--stage-tls-ca", "missing.pem"), "no such file"),
    ],
)
def test_half_a_stage_security_setup_is_one_usage_error(
    extra: tuple[str, ...], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("not really\n", encoding="utf-8")
    argv = ["--tls-cert", str(pem), "--tls-key", str(pem), *(str(pem) if arg == "CA" else arg for arg in extra)]
    with pytest.raises(SystemExit) as exited:
        config_from_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
