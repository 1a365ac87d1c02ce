"""The transport floor: a bare `grpc.aio` echo, measured like the QA service (`qa-bench serve --echo-floor`).

A Python server process answers every call to `/echo.v1.Echo/Call` with a fixed 300-byte reply, and every
message on a `/echo.v1.Echo/Stream` call with one such reply; the client sends 1.5 KB requests (about one
question with an inline SQuAD passage) over unary calls or, as `qa-bench serve --api stream` does, over one
bidirectional stream per concurrent caller with one message in flight on each, on one channel, in the same
closed loop as the service benchmark. What the service adds is its latency above this row's, at the same
concurrency and API, in the same run. No protobuf: requests and replies are raw bytes. The echo server runs
on the event loop `--event-loop` names (as `qa-serve --event-loop`); the client on its caller's loop.

    python -m realtime_qa.benchmarks.grpc_echo serve [--event-loop uvloop]   # prints "listening on 127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from realtime_qa.benchmarks.report import loop_name, percentile_summary
from realtime_qa.services.config import EVENT_LOOPS

SERVICE = "echo.v1.Echo"
METHOD = f"/{SERVICE}/Call"
STREAM_METHOD = f"/{SERVICE}/Stream"
REQUEST_BYTES = 1536
REPLY_BYTES = 300
LISTENING = re.compile(r"listening on (\S+):(\d+)")
REPO = Path(__file__).resolve().parents[1]


async def serve(host: str, port: int) -> None:
    """Answer echo calls until SIGTERM/SIGINT."""
    import grpc

    reply = b"r" * REPLY_BYTES

    async def call(request: bytes, context: Any) -> bytes:
        return reply

    async def stream(requests: Any, context: Any) -> Any:
        async for _ in requests:
            yield reply

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {"Call": grpc.unary_unary_rpc_method_handler(call), "Stream": grpc.stream_stream_rpc_method_handler(stream)},
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"listening on {host}:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(grace=1)


async def closed_loop(
    target: str, concurrency: int, duration_s: float, warmup_s: float, api: str = "unary"
) -> dict[str, Any]:
    """`concurrency` callers, each sending its next request when the last reply arrives (over unary calls, or
    over a stream of its own)."""
    import grpc

    request = b"q" * REQUEST_BYTES
    latencies: list[int] = []
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        unary = channel.unary_unary(METHOD)
        streaming = channel.stream_stream(STREAM_METHOD)
        await asyncio.wait_for(channel.channel_ready(), 30)
        begin = time.perf_counter_ns()
        measure_from = begin + int(warmup_s * 1e9)
        measure_to = measure_from + int(duration_s * 1e9)

        async def caller(worker: int) -> None:
            nonlocal errors
            call = streaming(timeout=duration_s + warmup_s + 30) if api == "stream" else None
            for _ in itertools.count():
                started = time.perf_counter_ns()
                if started >= measure_to:
                    break
                try:
                    if call is None:
                        reply = await unary(request, timeout=30)
                    else:
                        await call.write(request)
                        reply = await call.read()
                    ok = isinstance(reply, bytes) and len(reply) == REPLY_BYTES
                except grpc.aio.AioRpcError:
                    ok = False
                done = time.perf_counter_ns()
                if measure_from <= done <= measure_to:
                    if ok:
                        latencies.append(done - started)
                    else:
                        errors += 1
                if not ok and call is not None:
                    call.cancel()
                    call = streaming(timeout=duration_s + warmup_s + 30)
            if call is not None:
                call.cancel()

        await asyncio.gather(*(caller(worker) for worker in range(concurrency)))
    return {
        "batching": "echo",
        "api": api,
        "concurrency": concurrency,
        "answered": len(latencies),
        "throughput_rps": round(len(latencies) / duration_s, 2),
        "client_ms": percentile_summary(np.asarray(latencies, dtype=np.float64) / 1e6),
        "errors": errors,
        "client_loop": loop_name(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


async def measure(
    concurrency: Sequence[int],
    duration_s: float,
    warmup_s: float,
    event_loop: str = "asyncio",
    apis: Sequence[str] = ("unary",),
) -> list[dict[str, Any]]:
    """Start an echo server process on `event_loop`, run every API and concurrency level against it, stop it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "realtime_qa.benchmarks.grpc_echo", "serve", "--event-loop", event_loop,
        cwd=REPO, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        line = (await asyncio.wait_for(process.stderr.readline(), 60)).decode()
        match = LISTENING.search(line)
        if match is None:
            raise RuntimeError(f"echo server did not start: {line!r}")
        target = f"{match.group(1)}:{match.group(2)}"
        rows = [await closed_loop(target, level, duration_s, warmup_s, api) for api in apis for level in concurrency]
        return [{**row, "event_loop": event_loop} for row in rows]
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 10)
        if process.returncode is None:
            process.kill()
            await process.wait()


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| transport floor | server loop | client loop | api | concurrency | calls/s | p50 ms | p90 ms | p99 ms "
        "| errors | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        client = row["client_ms"]
        lines.append(
            f"| grpc.aio echo ({REQUEST_BYTES} B -> {REPLY_BYTES} B) | {row.get('event_loop', 'asyncio')} | "
            f"{row.get('client_loop', 'asyncio')} | {row.get('api', 'unary')} | {row['concurrency']} | "
            f"{row['throughput_rps']:.1f} | {client.get('p50', float('nan')):.2f} | "
            f"{client.get('p90', float('nan')):.2f} | {client.get('p99', float('nan')):.2f} | {row['errors']} | "
            f"{row['load_avg_1m']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m realtime_qa.benchmarks.grpc_echo", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="run the echo server")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=0)
    serve_parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="asyncio")
    run_parser = sub.add_parser("run", help="start a server and measure it")
    run_parser.add_argument("--concurrency", default="1,256")
    run_parser.add_argument("--duration-s", type=float, default=5.0)
    run_parser.add_argument("--warmup-s", type=float, default=1.0)
    run_parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="asyncio")
    run_parser.add_argument("--api", default="unary", help="unary, stream, or unary,stream")
    args = parser.parse_args(argv)
    if args.command == "serve":
        from realtime_qa.services.cli import event_loop_factory

        with asyncio.Runner(loop_factory=event_loop_factory(args.event_loop)) as runner:
            runner.run(serve(args.host, args.port))
        return 0
    try:
        levels = [int(level) for level in args.concurrency.split(",") if level]
    except ValueError:
        print(f"python -m realtime_qa.benchmarks.grpc_echo: bad --concurrency {args.concurrency!r}", file=sys.stderr)
        return 2
    apis = tuple(api for api in args.api.split(",") if api)
    if not apis or not set(apis) <= {"unary", "stream"}:
        print(f"python -m realtime_qa.benchmarks.grpc_echo: --api must list unary and/or stream, got {args.api!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    print(markdown_table(asyncio.run(measure(levels, args.duration_s, args.warmup_s, args.event_loop, apis))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
