"""Closed-loop load on a running `qa-serve` from several client processes (one Python client process tops
out near the bare grpc.aio echo rate, ~7,000 calls/s, so 10,000 answers/s needs more than one).

    python3 -m realtime_qa.benchmarks.device.serve_load --target 127.0.0.1:50051 --concurrency 256 --processes 8 \
        --squad dev-v1.1.json.gz --out load.json [--passage-ids] [--api stream] [--event-loop asyncio]

Each process runs `qa-bench serve`'s closed loop (`benchmarks.serve_bench.closed_loop`) with its share
of the concurrency over its own channels (`--channels`), as unary calls or, with `--api stream`, over one
`AnswerStream` per concurrent caller (`qa-bench serve`'s `StreamPool`), on uvloop where installed;
latencies of all processes are pooled for the percentiles and the throughput is their summed completion
rate inside the same measured window.

`--pick` is how a process spreads its questions over its connections: `round-robin` (each question on the next
connection, as every earlier result file ran) or `least-busy` (on the connection with the fewest questions in
flight, ties in turn: gRPC's least-request balancing, as `QAClient(connections=N)` does). With `qa-serve
--workers N` the kernel hashes each connection to one worker (SO_REUSEPORT), so some workers hold more
connections than others; round-robin sends them as many questions as the rest regardless, least-busy sends
fewer to a worker that answers slower.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from realtime_qa.benchmarks.report import percentile_summary
from realtime_qa.pipeline.client import LeastBusy
from realtime_qa.qacore.latency import STAGES
from realtime_qa.services.config import EVENT_LOOPS

T = TypeVar("T")


PICKS = ("round-robin", "least-busy")


def picker(targets: list[T], in_flight: Callable[[T], int], pick: str) -> Callable[[], T]:
    """Which of `targets` takes the next question: in turn, or the one with the fewest `in_flight` (ties in turn),
    as `QAClient` with `ClientConfig(connections=N)` picks its connections."""
    if pick == "round-robin":
        turn = itertools.cycle(targets)
        return lambda: next(turn)
    return LeastBusy(targets, in_flight)


def _client(target: str, squad: str, questions: int, concurrency: int, duration: float, warmup: float,
            passage_ids: bool, offset: int, channels: int, api: str, event_loop: str,
            pick: str) -> dict[str, Any]:  # fmt: skip
    from realtime_qa.benchmarks.serve_bench import ServeBenchConfig, StreamPool, closed_loop, load_questions
    from realtime_qa.pipeline.client import ClientConfig, QAClient, Question, RetryPolicy
    from realtime_qa.services.cli import event_loop_factory

    async def run() -> dict[str, Any]:
        config = ServeBenchConfig(target=target, duration_s=duration, warmup_s=warmup)
        pairs = load_questions(Path(squad), questions)
        pairs = pairs[offset % len(pairs) :] + pairs[: offset % len(pairs)]
        # Several connections per process: `--workers` processes share the port by SO_REUSEPORT, which spreads
        # connections, not calls; with one connection per load process, 8 connections left 3 of 8 workers without
        # any load (profile_load_h200: cpu_by_process). Each client needs `own_connection`: without it gRPC gave
        # all of a process's channels one connection (so `--channels` did nothing before 2026-12-02 19:10 UTC).
        clients = [QAClient(target, ClientConfig(retry=RetryPolicy(max_attempts=1), timeout_s=60, own_connection=True))
                   for _ in range(channels)]  # fmt: skip
        client = clients[0]
        next_client = picker(clients, lambda each: sum(each.in_flight), pick)  # QAClient counts its calls in flight
        try:
            for each in clients:
                await each.wait_ready(120)
            asked = [Question(q, p) for q, p in pairs]
            if passage_ids:
                stored = {p: (await client.put_passage(p)).passage_id for p in {p for _, p in pairs}}
                asked = [Question(q, passage_id=stored[p]) for q, p in pairs]

            async def ask_unary(question: Question) -> Any:
                return await next_client().answer(question, timeout_s=60)

            # Streams: one AnswerStream per concurrent caller, spread over the channels.
            sizes = [concurrency // channels + (index < concurrency % channels) for index in range(channels)]
            pools = (
                [StreamPool(each, size) for each, size in zip(clients, sizes, strict=True) if size]
                if api == "stream"
                else []
            )
            send = ask_unary
            if pools:
                next_pool = picker(pools, lambda pool: len(pool.waiting), pick)

                async def ask_stream(question: Question) -> Any:
                    return await next_pool().ask(question)

                send = ask_stream
            gc.collect()
            gc.freeze()  # as qa-bench serve does: no full collection walks the questions while measuring
            samples = await closed_loop(send, asked, concurrency, config)
            for pool in pools:
                await pool.close()
        finally:
            for each in clients:
                await each.close()
        kept = samples.timings[:2000]
        server_ms = {stage: [t.stage_ns(stage) / 1e6 for t in kept] for stage in (*STAGES, "total")}
        return {"latencies_ns": samples.latencies_ns, "codes": dict(samples.codes), "server_ms": server_ms}

    with asyncio.Runner(loop_factory=event_loop_factory(event_loop)) as runner:
        return runner.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--squad", required=True)
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--duration-s", type=float, default=6.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--passage-ids", action="store_true")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels (connections) per client process")
    parser.add_argument("--api", choices=("unary", "stream"), default="unary",
                        help="unary Answer calls, or one AnswerStream per concurrent caller")  # fmt: skip
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto",
                        help="the load processes' event loop (auto: uvloop where installed)")  # fmt: skip
    parser.add_argument("--pick", choices=PICKS, default="round-robin",
                        help="how each process spreads its questions over its connections (see above)")  # fmt: skip
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.processes < 1 or args.concurrency < args.processes or not 1 <= args.channels <= 64:
        print("serve_load: need 1 <= processes <= concurrency and 1 <= channels <= 64", file=sys.stderr)
        return 2
    shares = [
        args.concurrency // args.processes + (i < args.concurrency % args.processes) for i in range(args.processes)
    ]
    with ProcessPoolExecutor(args.processes) as pool:
        futures = [
            pool.submit(_client, args.target, args.squad, args.questions, share, args.duration_s, args.warmup_s,
                        args.passage_ids, index * 97, args.channels, args.api, args.event_loop, args.pick)
            for index, share in enumerate(shares)
        ]  # fmt: skip
        parts = [future.result() for future in futures]
    latencies = np.concatenate([np.asarray(part["latencies_ns"], dtype=np.float64) for part in parts]) / 1e6
    codes: dict[str, int] = {}
    for part in parts:
        for code, count in part["codes"].items():
            codes[code] = codes.get(code, 0) + count
    row = {
        "label": args.label,
        "target": args.target,
        "concurrency": args.concurrency,
        "client_processes": args.processes,
        "channels_per_process": args.channels,
        "api": args.api,
        "client_event_loop": args.event_loop,
        "pick": args.pick,
        "passage_ids": args.passage_ids,
        "answers_per_s": round(latencies.size / args.duration_s, 1),
        "client_ms": percentile_summary(latencies),
        "server_ms": {
            stage: percentile_summary(np.concatenate([np.asarray(p["server_ms"][stage]) for p in parts]))
            for stage in (*STAGES, "total")
        },
        "codes": codes,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    client, server = row["client_ms"], row["server_ms"]
    stages = ", ".join(f"{stage} {server[stage].get('p50', float('nan')):.2f}" for stage in (*STAGES, "total"))
    print(
        f"{args.label}: {args.api} c={args.concurrency} x{args.processes} procs ({args.pick}): "
        f"{row['answers_per_s']:,.0f} answers/s, "
        f"p50 {client.get('p50', float('nan')):.2f} ms, p99 {client.get('p99', float('nan')):.2f} ms, codes {codes}; "
        f"server p50 ms: {stages}"
    )
    if args.out is not None:
        args.out.write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
