"""`qa-serve`: run the question-answering gRPC server until SIGTERM or SIGINT, then shut down gracefully."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from realtime_qa.qacore.errors import EngineError, QAError
from realtime_qa.services.config import ServerConfig, config_from_args
from realtime_qa.services.logctx import configure_logging
from realtime_qa.services.server import QAServer

log = logging.getLogger("qa-serve")

EXIT_ENGINE = 3  # an engine that cannot be used (missing, corrupt, faulty): it never reports SERVING
EXIT_USAGE = 2


class EventLoopUnavailable(Exception):  # noqa: N818 - reads as what happened
    """The event loop `--event-loop` names is not installed (its message is the one line to print)."""


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """How to make the event loop `name` (`ServerConfig.event_loop`); None: asyncio's own. uvloop is imported
    here, only when asked for ("auto" or "uvloop"); "auto" falls back to asyncio where it is not installed."""
    if name == "asyncio":
        return None
    if name not in ("auto", "uvloop"):
        raise ValueError(f"unknown event loop {name!r}")
    try:
        import uvloop
    except ImportError:
        if name == "auto":  # e.g. Windows, where uvloop does not exist
            return None
        raise EventLoopUnavailable(
            "--event-loop uvloop needs the uvloop package: pip install 'realtime-qa[uvloop]'"
        ) from None
    return uvloop.new_event_loop


def run_server(config: ServerConfig) -> int:
    """Run `serve(config)` on the event loop the config names; returns the exit code."""
    with asyncio.Runner(loop_factory=event_loop_factory(config.event_loop)) as runner:
        return runner.run(serve(config))


async def serve(config: ServerConfig) -> int:
    """Run a server until a termination signal; returns the process exit code."""
    server = QAServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tokens)  # rotate bearer tokens without a restart
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("signal received during start-up: stopping")
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await server.stop()
        return 0
    start_failure = starting.exception()
    if start_failure is not None:
        if isinstance(start_failure, (QAError, OSError, ValueError)):
            log.error("cannot serve: %s", start_failure)
        else:
            log.error("cannot serve", exc_info=start_failure)
        stopping.cancel()
        await server.stop(0)
        return EXIT_ENGINE if isinstance(start_failure, EngineError) else 1  # 3: like qa-assistant and qa-eval
    await stopping
    log.info("signal received: shutting down")
    await server.stop()
    if server.engine_calls_abandoned:
        raise HardExit(0)
    return 0


class HardExit(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The server stopped within its grace period but left an engine call running on a thread, which the
    interpreter would wait for at exit: end the process now instead (logs are flushed first)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(argv)
    configure_logging(config.log_level)
    try:
        event_loop_factory(config.event_loop)  # a missing uvloop is one line here, not one per worker
    except EventLoopUnavailable as exc:
        print(f"qa-serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if config.workers > 1 or config.engine_process:  # N processes on one port, metrics merged (services/workers.py)
        from realtime_qa.services.workers import run_workers

        return run_workers(config)
    try:
        return run_server(config)
    except HardExit as exit_now:
        logging.shutdown()
        os._exit(exit_now.code)
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


if __name__ == "__main__":
    sys.exit(main())
