"""One stage of the chain in its own process (`qa-pipeline --split` starts one per stage).

    python -m realtime_qa.pipeline.stage_process asr --port 0 [--chunk-latency-ms 5] [--final-latency-ms 30]
    python -m realtime_qa.pipeline.stage_process response --port 0 [--no-speech]
    python -m realtime_qa.pipeline.stage_process qa --port 0 [--engine DIR]

Every stage takes the security flags of `qa-serve` (--tls-cert, --tls-key, --tls-client-ca,
--auth-token-file): its server then demands TLS, client certificates and bearer tokens the same way
(health checks exempt). `qa-pipeline --split` passes its own flags on.

Once serving, it prints one JSON line on stdout ({"stage", "target", "audio_available"}) so that the
parent learns the port, then runs until SIGTERM/SIGINT (or until its stdin closes: the parent died)
and shuts down gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from realtime_qa.services.asr_stub import AsrStub, AsrStubConfig, asr_server
from realtime_qa.services.auth import AuthInterceptor, ServerSecurity
from realtime_qa.services.logctx import configure_logging
from realtime_qa.services.response_service import ReplyMaker, ResponderConfig, response_server

STAGES = ("asr", "response", "qa")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m realtime_qa.pipeline.stage_process", description=__doc__.splitlines()[0]
    )
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunk-latency-ms", type=float, default=0.0)
    parser.add_argument("--final-latency-ms", type=float, default=0.0)
    parser.add_argument("--speech", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--engine", type=Path, default=None)
    parser.add_argument("--log-level", default="WARNING")
    ServerSecurity.add_arguments(parser)
    return parser


async def _until_stopped() -> None:
    """Returns on SIGTERM, SIGINT or end of stdin (the parent is gone)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def stdin_readable() -> None:  # end of stdin: the parent closed its pipe, or died
        try:
            data = os.read(sys.stdin.fileno(), 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    with contextlib.suppress(OSError, ValueError, NotImplementedError):  # no usable stdin: signals only
        loop.add_reader(sys.stdin.fileno(), stdin_readable)
    await stop.wait()


def _announce(stage: str, target: str, audio_available: bool = False) -> None:
    print(json.dumps({"stage": stage, "target": target, "audio_available": audio_available}), flush=True)


async def run(args: argparse.Namespace) -> int:
    security = ServerSecurity.from_args(args)
    if args.stage == "qa":
        from realtime_qa.services.config import EngineSpec, ServerConfig
        from realtime_qa.services.server import QAServer

        engines = (EngineSpec(args.engine),) if args.engine else ()
        config = ServerConfig(
            host=args.host,
            port=args.port,
            engines=engines,
            grace_s=2.0,
            tls_cert=security.tls_cert,
            tls_key=security.tls_key,
            tls_client_ca=security.tls_client_ca,
            auth_token_file=security.auth_token_file,
        )
        server = QAServer(config)
        await server.start()
        _announce("qa", server.target)
        try:
            await _until_stopped()
        finally:
            await server.stop()
        return 0
    interceptors = (AuthInterceptor(security.tokens()),)
    if args.stage == "asr":
        stub = AsrStub(AsrStubConfig(args.chunk_latency_ms, args.final_latency_ms))
        stage, audio = asr_server(stub, args.host, args.port, interceptors), False
    else:
        maker = ReplyMaker(ResponderConfig(speech=args.speech))
        stage, audio = response_server(maker, args.host, args.port, interceptors), maker.audio_available
    stage.credentials = security.credentials()
    await stage.start()
    _announce(args.stage, stage.target, audio)
    try:
        await _until_stopped()
    finally:
        await stage.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return asyncio.run(run(args))
    except (OSError, ValueError) as exc:
        print(f"{args.stage} stage: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
