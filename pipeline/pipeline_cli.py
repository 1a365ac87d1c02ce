"""`qa-pipeline`: run the conversational chain (ASR stub -> QA -> response, the assistant.v1 front, the dashboard).

    qa-pipeline                       # one process; assistant.v1 on 127.0.0.1:50061, dashboard on :8080
    qa-pipeline --split               # each stage in its own process on a loopback port
    qa-pipeline --qa-target HOST:PORT # ask a running qa-serve instead of starting QA

Security: --tls-cert/--tls-key (TLS), --tls-client-ca (mutual TLS) and --auth-token-file (bearer
tokens) protect the assistant.v1 front; with --split every stage process demands the same, and the
chain reaches its stages over TLS (verifying them with --stage-tls-ca, default --tls-client-ca, else
--tls-cert itself; presenting --stage-tls-client-cert/--stage-tls-client-key under mutual TLS) with the
first token of the token file, which it also presents to a --qa-target.

Runs until SIGTERM or SIGINT, then shuts everything down (stage processes too). Bad flags are one
line on stderr and exit code 2; a chain that cannot start exits with 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from realtime_qa.pipeline.chain import ChainSettings
from realtime_qa.pipeline.client import ClientConfig
from realtime_qa.pipeline.launcher import DEFAULT_ASSISTANT_PORT, DEFAULT_DASHBOARD_PORT, ChainConfig, start_chain
from realtime_qa.qacore.cli_args import OneLineParser
from realtime_qa.qacore.errors import QAError
from realtime_qa.qacore.latency import parse_budgets
from realtime_qa.services.asr_stub import AsrStubConfig
from realtime_qa.services.auth import AuthInterceptor, ServerSecurity, read_tokens
from realtime_qa.services.logctx import configure_logging
from realtime_qa.services.response_service import ResponderConfig

log = logging.getLogger("qa-pipeline")
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="qa-pipeline",
        description="Run the conversational chain: ASR stub -> QA -> response behind assistant.v1, with a "
        "latency dashboard.",
    )
    add = parser.add_argument
    add("--engine", type=Path, help="QA engine directory (default: the shipped model's CPU engine)")
    add("--qa-target", metavar="HOST:PORT", help="use a running qa-serve instead of starting QA")
    add(
        "--qa-connections",
        type=int,
        default=1,
        metavar="N",
        help="connections to the QA server, each question on the least busy: for a --qa-target that is one "
        "qa-serve --workers N without a proxy (default: %(default)s)",
    )
    add("--split", action="store_true", help="run each stage in its own process on a loopback port")
    add("--host", default="127.0.0.1", help="address of the assistant.v1 front (default: %(default)s)")
    add(
        "--port", type=int, default=DEFAULT_ASSISTANT_PORT, help="assistant.v1 port; 0 picks one (default: %(default)s)"
    )
    add("--dashboard-host", default="127.0.0.1", help="address of the dashboard (default: %(default)s)")
    add("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT, help="dashboard port (default: %(default)s)")
    add("--no-dashboard", action="store_true", help="do not serve the dashboard")
    add("--budgets", default="", metavar="STAGE=DURATION,...", help="default budgets, e.g. qa=10ms,asr=40ms,turn=120ms")
    add("--asr-chunk-latency-ms", type=float, default=0.0, help="ASR stub: simulated work per audio chunk")
    add("--asr-final-latency-ms", type=float, default=0.0, help="ASR stub: simulated end-of-utterance latency")
    add("--no-speech", action="store_true", help="never synthesize reply audio (espeak-ng is used when installed)")
    add("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    ServerSecurity.add_arguments(parser)  # TLS, mutual TLS and bearer tokens of the assistant.v1 front
    add(
        "--stage-tls-ca",
        type=Path,
        help="--split: PEM CA that signed --tls-cert (default: --tls-client-ca, else --tls-cert)",
    )
    add("--stage-tls-client-cert", type=Path, help="--split with --tls-client-ca: the chain's client certificate")
    add("--stage-tls-client-key", type=Path, help="--split with --tls-client-ca: the chain's client key")
    return parser


def stage_client_config(args: argparse.Namespace, security: ServerSecurity) -> ClientConfig | None:
    """How the chain dials its split stages (which demand `security`) and a --qa-target; None: plaintext."""
    token = read_tokens(security.auth_token_file)[0].decode("utf-8") if security.auth_token_file else None
    root = None
    if args.split and security.tls_cert is not None:
        root = args.stage_tls_ca or security.tls_client_ca or security.tls_cert
    elif args.qa_target and args.stage_tls_ca is not None:
        root = args.stage_tls_ca
    client_cert, client_key = args.stage_tls_client_cert, args.stage_tls_client_key
    if args.split and security.tls_client_ca is not None and client_cert is None:
        raise ValueError("--split with --tls-client-ca needs --stage-tls-client-cert and --stage-tls-client-key")
    for path in (root, client_cert, client_key):
        if path is not None and not path.is_file():
            raise ValueError(f"{path}: no such file")
    if token is None and root is None:
        return None
    return ClientConfig(tls_root_cert=root, tls_client_cert=client_cert, tls_client_key=client_key, token=token)


def config_from_args(argv: Sequence[str] | None) -> tuple[ChainConfig, str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        security = ServerSecurity.from_args(args)
        tokens = security.tokens()
        credentials = security.credentials()
        stage_client = stage_client_config(args, security)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if args.engine is not None and args.qa_target is not None:
        parser.error("--engine and --qa-target exclude each other")
    if args.engine is not None and not args.engine.is_dir():
        parser.error(f"--engine {args.engine}: not a directory")
    try:
        config = ChainConfig(
            engine_dir=args.engine,
            qa_target=args.qa_target,
            split=args.split,
            host=args.host,
            assistant_port=args.port,
            dashboard_host=args.dashboard_host,
            dashboard_port=None if args.no_dashboard else args.dashboard_port,
            asr=AsrStubConfig(args.asr_chunk_latency_ms, args.asr_final_latency_ms),
            responder=ResponderConfig(speech=not args.no_speech),
            chain=ChainSettings(),
            budgets=parse_budgets(args.budgets),
            stage_log_level=args.log_level if args.log_level != "INFO" else "WARNING",
            interceptors=(AuthInterceptor(tokens),),
            front_credentials=credentials,
            stage_security=security if args.split and security != ServerSecurity() else None,
            stage_client=stage_client,
            qa_connections=args.qa_connections,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return config, args.log_level


async def run(config: ChainConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    for interceptor in config.interceptors:  # rotate the front's bearer tokens without a restart
        if isinstance(interceptor, AuthInterceptor) and interceptor.tokens is not None:
            loop.add_signal_handler(signal.SIGHUP, interceptor.tokens.reload)
    starting = asyncio.create_task(_serve(config, stop))
    return await starting


async def _serve(config: ChainConfig, stop: asyncio.Event) -> int:
    try:
        async with start_chain(config) as chain:
            print(f"assistant.v1 on {chain.assistant_target}; QA at {chain.qa_target}", file=sys.stderr)
            if chain.dashboard_url:
                print(f"dashboard: {chain.dashboard_url}", file=sys.stderr)
            print("ready (Ctrl-C stops)", file=sys.stderr, flush=True)
            await stop.wait()
            log.info("signal received: shutting down")
    except (OSError, QAError, ValueError) as exc:
        print(f"qa-pipeline: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config, level = config_from_args(argv)
    configure_logging(level)
    try:
        return asyncio.run(run(config))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
