"""Start the whole chain (ASR stub, QA, response, the assistant.v1 front, the dashboard) from Python.

    config = ChainConfig(assistant_port=0, dashboard_port=0)
    async with start_chain(config) as chain:
        chain.assistant_target   # "127.0.0.1:PORT" of assistant.v1
        chain.qa_target          # the qa.v1 server the chain asks
        chain.board              # every turn's TurnReport is recorded here
        chain.dashboard_url      # "http://127.0.0.1:PORT/" (None without a dashboard)

One process (default): the ASR stub and the response stage run on this event loop behind their
in-process adapters; QA is a `QAServer` in this process (its service called in-process, and its
qa.v1 port open for others), or the `qa_target` server. `split=True`: each stage runs in its own
process on a loopback port (`pipeline.stage_process`) and the chain reaches them over gRPC; the
same chain code runs either way. `qa-pipeline` and `qa-bench pipeline` use this; so do the tests.

Security of the stages: `stage_security` (TLS, mutual TLS, token file) is passed to every split stage
process, whose servers then demand it like the front does; `stage_client` is how the chain dials its
stages and a `qa_target` (the CA that signed their certificate, the chain's client certificate, its
bearer token).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from realtime_qa.pipeline.chain import Chain, ChainSettings
from realtime_qa.pipeline.client import MAX_CONNECTIONS, ClientConfig
from realtime_qa.pipeline.front import AssistantService, ReportSink, assistant_server
from realtime_qa.pipeline.stages import Stages
from realtime_qa.qacore.latency import Budgets
from realtime_qa.services.asr_stub import AsrStub, AsrStubConfig
from realtime_qa.services.auth import ServerSecurity
from realtime_qa.services.response_service import ReplyMaker, ResponderConfig
from realtime_qa.services.stage_server import StageServer

log = logging.getLogger(__name__)

DEFAULT_ASSISTANT_PORT = 50061
DEFAULT_DASHBOARD_PORT = 8080


@dataclass(frozen=True)
class ChainConfig:
    """Everything `start_chain` needs; the defaults are `qa-pipeline`'s."""

    engine_dir: Path | None = None  # None: the shipped model's CPU engine (built on first use)
    qa_target: str | None = None  # HOST:PORT of a running qa-serve: used instead of starting QA
    split: bool = False  # each stage in its own process on a loopback port
    host: str = "127.0.0.1"  # where the assistant.v1 front listens
    assistant_port: int = DEFAULT_ASSISTANT_PORT  # 0 picks a free port
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int | None = DEFAULT_DASHBOARD_PORT  # None: no dashboard; 0 picks a free port
    asr: AsrStubConfig = field(default_factory=AsrStubConfig)
    responder: ResponderConfig = field(default_factory=ResponderConfig)
    chain: ChainSettings = field(default_factory=ChainSettings)
    budgets: Budgets = field(default_factory=Budgets)  # sessions' defaults (a session may set its own)
    qa_max_batch_size: int | None = None  # None: qa-serve's default
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()  # extra interceptors of the front (e.g. auth)
    max_sessions: int = 256  # open Converse sessions; more are RESOURCE_EXHAUSTED
    front_credentials: grpc.ServerCredentials | None = None  # TLS / mutual TLS of the front (services.auth)
    startup_timeout_s: float = 600.0  # a split stage must be serving by then (the engine may be built first)
    stage_log_level: str = "WARNING"  # log level of split stage processes
    stage_security: ServerSecurity | None = None  # TLS / tokens the split stage servers demand
    stage_client: ClientConfig | None = None  # TLS / token the chain presents to its stages and to qa_target
    # Connections to the QA server, each question on the least busy (`ClientConfig.connections`): for a qa_target
    # that is one `qa-serve --workers N` without a proxy in front (SO_REUSEPORT spreads connections, not calls).
    qa_connections: int = 1

    def __post_init__(self) -> None:
        for port in (self.assistant_port, self.dashboard_port):
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"port must be in [0, 65535], got {port}")
        if not 1 <= self.qa_connections <= MAX_CONNECTIONS:
            raise ValueError(f"QA connections must be 1..{MAX_CONNECTIONS}, not {self.qa_connections}")
        if self.startup_timeout_s <= 0 or self.max_sessions < 1:
            raise ValueError("startup timeout and max sessions must be positive")
        if self.stage_security is not None and not self.split:
            raise ValueError("stage_security is for split stage processes (split=True)")

    def stage_process_args(self) -> tuple[str, ...]:
        """The flags that hand `stage_security` on to a stage process."""
        security = self.stage_security
        if security is None:
            return ()
        flags = (
            ("--tls-cert", security.tls_cert),
            ("--tls-key", security.tls_key),
            ("--tls-client-ca", security.tls_client_ca),
            ("--auth-token-file", security.auth_token_file),
        )
        return tuple(item for flag, path in flags if path is not None for item in (flag, str(path)))


@dataclass
class RunningChain:
    """A started chain; valid inside `start_chain`'s block."""

    config: ChainConfig
    assistant_target: str
    qa_target: str
    board: Any  # pipeline.board.LatencyBoard (or the ReportSink given to start_chain)
    dashboard_url: str | None
    asr_target: str | None = None  # split only: the stages' own servers
    response_target: str | None = None
    info: dict[str, str] = field(default_factory=dict)


class StageProcess:
    """A stage in a child process (split mode): started, announced, stopped with SIGTERM."""

    def __init__(self, stage: str, args: Sequence[str]) -> None:
        self.stage = stage
        self.args = tuple(args)
        self.process: asyncio.subprocess.Process | None = None
        self.announcement: dict[str, Any] = {}

    async def start(self, timeout_s: float) -> dict[str, Any]:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "realtime_qa.pipeline.stage_process",
            self.stage,
            *self.args,
            stdin=asyncio.subprocess.PIPE,  # closed when this process dies: the child then stops too
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                line = await self.process.stdout.readline()
        except TimeoutError:
            raise OSError(f"{self.stage} stage not serving after {timeout_s:g} s") from None
        if not line:
            code = await self.process.wait()
            raise OSError(f"{self.stage} stage exited with code {code} before serving (see its log above)")
        self.announcement = json.loads(line)
        return self.announcement

    async def stop(self, timeout_s: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                await process.wait()
        except TimeoutError:
            log.warning("%s stage ignored SIGTERM for %.0f s: killing it", self.stage, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def default_board(config: ChainConfig) -> Any:
    from realtime_qa.pipeline.board import BoardConfig, LatencyBoard

    return LatencyBoard(BoardConfig(budgets=config.budgets))


@contextlib.asynccontextmanager
async def start_chain(
    config: ChainConfig | None = None, board: ReportSink | None = None
) -> AsyncIterator[RunningChain]:
    """Start every part of the chain; stop them all (children too) when the block ends."""
    config = config or ChainConfig()
    board = board if board is not None else default_board(config)
    async with contextlib.AsyncExitStack() as stack:
        stages, running = await _start_stages(config, stack)
        stack.push_async_callback(stages.close)
        service = AssistantService(Chain(stages, config.chain), board, config.budgets, config.max_sessions)
        front: StageServer = assistant_server(service, config.host, config.assistant_port, config.interceptors)
        front.credentials = config.front_credentials
        await front.start()
        stack.push_async_callback(front.stop)
        running.assistant_target = front.target
        running.board = board
        running.info.update(
            {
                "mode": "split" if config.split else "one process",
                "assistant": front.target,
                "qa": running.qa_target,
                "audio": "espeak-ng" if stages.response.audio_available else "none (espeak-ng not available)",
            }
        )
        await _describe_qa(running, config.stage_client if config.split or config.qa_target else None)
        if hasattr(board, "set_info"):
            board.set_info(dict(running.info))
        if config.dashboard_port is not None:
            from realtime_qa.pipeline.dashboard import start_dashboard

            dashboard = await start_dashboard(board, config.dashboard_host, config.dashboard_port)  # type: ignore[arg-type]
            stack.push_async_callback(dashboard.stop)
            host = config.dashboard_host if config.dashboard_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
            running.dashboard_url = f"http://{host}:{dashboard.port}/"
        log.info("chain ready: assistant.v1 at %s, dashboard %s", front.target, running.dashboard_url or "off")
        yield running


async def _start_stages(config: ChainConfig, stack: contextlib.AsyncExitStack) -> tuple[Stages, RunningChain]:
    from realtime_qa.pipeline.grpc_stages import GrpcQuestionAnswering, GrpcRecognizer, GrpcResponder

    qa_target = config.qa_target
    if not config.split:
        from realtime_qa.pipeline.local_stages import LocalQuestionAnswering, LocalRecognizer, LocalResponder

        qa: Any
        if qa_target is None:
            server = await _start_qa_server(config)
            stack.push_async_callback(server.stop)
            qa, qa_target = LocalQuestionAnswering(server), server.target
        else:
            qa = GrpcQuestionAnswering(qa_target, config.stage_client, config.qa_connections)
            await qa.client.wait_ready(config.startup_timeout_s)
        stages = Stages(LocalRecognizer(AsrStub(config.asr)), qa, LocalResponder(ReplyMaker(config.responder)))
        return stages, RunningChain(config, "", qa_target, None, None)

    level = ("--log-level", config.stage_log_level, *config.stage_process_args())
    children = [
        StageProcess(
            "asr",
            (
                "--chunk-latency-ms",
                str(config.asr.chunk_latency_ms),
                "--final-latency-ms",
                str(config.asr.final_latency_ms),
                *level,
            ),
        ),
        StageProcess("response", ("--speech" if config.responder.speech else "--no-speech", *level)),
    ]
    if qa_target is None:
        engine = ("--engine", str(config.engine_dir)) if config.engine_dir else ()
        children.append(StageProcess("qa", (*engine, *level)))
    for child in children:
        stack.push_async_callback(child.stop)
    announced = await asyncio.gather(*(child.start(config.startup_timeout_s) for child in children))
    targets = {entry["stage"]: entry for entry in announced}
    qa_target = qa_target or targets["qa"]["target"]
    assert qa_target is not None
    grpc_qa = GrpcQuestionAnswering(qa_target, config.stage_client, config.qa_connections)
    await grpc_qa.client.wait_ready(config.startup_timeout_s)
    stages = Stages(
        GrpcRecognizer(targets["asr"]["target"], config.stage_client),
        grpc_qa,
        GrpcResponder(targets["response"]["target"], bool(targets["response"]["audio_available"]), config.stage_client),
    )
    running = RunningChain(config, "", qa_target, None, None)
    running.asr_target, running.response_target = targets["asr"]["target"], targets["response"]["target"]
    return stages, running


async def _start_qa_server(config: ChainConfig) -> Any:
    from realtime_qa.services.config import BatcherConfig, EngineSpec, ServerConfig
    from realtime_qa.services.server import QAServer

    engines = (EngineSpec(config.engine_dir),) if config.engine_dir else ()
    batcher = BatcherConfig() if config.qa_max_batch_size is None else BatcherConfig(config.qa_max_batch_size)
    server = QAServer(ServerConfig(port=0, engines=engines, batcher=batcher, grace_s=2.0))
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    return server


async def _describe_qa(running: RunningChain, security: ClientConfig | None) -> None:
    """Engine and model of the QA stage, for the dashboard (best effort)."""
    from realtime_qa.pipeline.client import QAClient

    try:
        async with QAClient(running.qa_target, security) as client:
            model = await client.model_info(timeout_s=5.0)
    except Exception as exc:  # the chain works without this description
        log.warning("cannot describe the QA model: %s", exc)
        return
    running.info.update(
        {
            "model": model.model_id,
            "engine": f"{model.backend}-{model.precision}",
            "backend_version": model.backend_version,
            "max_batch_size": str(model.max_batch_size),
        }
    )
