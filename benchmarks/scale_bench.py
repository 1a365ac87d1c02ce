"""`qa-bench scale`: answers/s through nginx for 1, 2 and 3 replicas, and for `qa-serve --workers 1, 2`.

One run starts every server itself (separate `qa-serve` processes on free loopback ports, the CPU engine,
batching off as in production on CPU), renders the repo's nginx configuration (deploy/nginx/) for each
topology, starts Debian's nginx, and drives the same closed-loop load (`qa-bench serve`'s load generator:
SQuAD dev questions, unary calls, retries off so every failure is counted) through it. The baseline, in
the same run: one replica reached directly, without nginx.

    qa-bench scale --json-out benchmarks/results/scale_cpu.json --markdown-out benchmarks/results/scale_cpu.md

Each point also records the 1-minute load average: on a shared host other work moves every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from realtime_qa.benchmarks.report import errors_cell, machine_description, number_list, table_head
from realtime_qa.benchmarks.serve_bench import (
    DEFAULT_SQUAD,
    ServeBenchConfig,
    StartedServer,
    closed_loop,
    load_questions,
    sender,
    summarize,
)
from realtime_qa.pipeline.client import ClientConfig, QAClient, QAClientError, Question, RetryPolicy

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
NGINX_RENDER = REPO / "deploy" / "nginx" / "render.py"
LIMITS_NOTE = (
    "Two cores are shared by every process of a point: nginx, the load generator (one Python process) and each "
    "replica's event loop, gRPC threads and ONNX Runtime thread, so more replicas or workers cannot add cores: "
    "on a quiet 2-core host the ratio is bounded by about 2x (one replica runs one engine thread plus its Python "
    "request path; two can keep both cores busy, a third only takes turns). On this development machine the host "
    "is also shared with other jobs (load average in every row, well above 2): the kernel shares CPU time per "
    "thread, so setups with more processes win a larger share of the busy machine from the other jobs, which can "
    "push ratios above what the cores allow and makes single points noisy; rounds are interleaved and the median "
    "shown to damp drift. nginx adds one hop per call (the direct row is the baseline). Workers share one port: "
    "the kernel spreads connections, not calls, so a few long-lived client connections (nginx keeps up to 64 to "
    "each upstream) can land unevenly. On a host with more free cores than one replica uses, replicas and workers "
    "add throughput until the cores run out."
)


@dataclass(frozen=True)
class ScaleBenchConfig:
    engine: Path | None = None  # None: the shipped model's default CPU engine
    squad: Path = DEFAULT_SQUAD
    questions: int = 500
    replicas: tuple[int, ...] = (1, 2, 3)
    workers: tuple[int, ...] = (1, 2)
    concurrency: int = 16
    duration_s: float = 10.0
    warmup_s: float = 2.0
    intra_op_threads: int = 1  # per engine call: several processes share the cores
    rounds: int = 3  # every setup is measured once per round; the table shows the median over rounds
    warmup_round: bool = True  # one unmeasured round over every setup first
    timeout_s: float = 30.0


def load_renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_nginx_render", NGINX_RENDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def nginx_in_front(upstreams: Sequence[str]) -> AsyncIterator[str]:
    """Debian's nginx with the repo's configuration balancing `upstreams`; yields its address."""
    render = load_renderer()
    with tempfile.TemporaryDirectory(prefix="qa-bench-nginx-") as directory:
        port = free_port()
        layout = render.NginxLayout(
            prefix=Path(directory), qa_listen=f"127.0.0.1:{port}", qa_upstreams=tuple(upstreams)
        )
        render.render(layout)
        process = subprocess.Popen(
            render.nginx_command(layout, shutil.which("nginx") or "nginx"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while not _port_open(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    error_log = Path(directory, "error.log")
                    detail = error_log.read_text() if error_log.exists() else ""
                    raise RuntimeError(f"nginx did not start:\n{detail}")
                await asyncio.sleep(0.05)
            yield f"127.0.0.1:{port}"
        finally:
            process.send_signal(signal.SIGQUIT)  # graceful: finish open requests
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def answers_by_replica(metrics_url: str | None) -> float:
    """Answered questions so far, from a server's Prometheus endpoint."""
    if metrics_url is None:
        return 0.0
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("qa_stage_latency_seconds_count") and 'stage="end_to_end"' in line
    )


async def wait_serving(server: StartedServer, timeout_s: float = 600.0) -> None:
    """Until `server` reports SERVING; a server that exits instead (a bad engine, say) fails at once with its log."""
    deadline = time.monotonic() + timeout_s
    async with QAClient(server.target, ClientConfig(retry=RetryPolicy(max_attempts=1))) as client:
        while True:
            if server.process.returncode is not None:
                raise RuntimeError("qa-serve exited during start-up:\n" + "\n".join(server.lines[-10:]))
            try:
                await client.wait_ready(2.0)
                return
            except QAClientError:
                if time.monotonic() > deadline:
                    raise


async def measure(
    label: str, target: str, pairs: list[tuple[str, str]], config: ScaleBenchConfig, servers: Sequence[StartedServer]
) -> dict[str, Any]:
    """One closed-loop point against `target`; how the answers spread over `servers` comes from their metrics."""
    load = ServeBenchConfig(duration_s=config.duration_s, warmup_s=config.warmup_s, timeout_s=config.timeout_s)
    client_config = ClientConfig(retry=RetryPolicy(max_attempts=1), timeout_s=config.timeout_s)
    async with QAClient(target, client_config) as client:
        await client.wait_ready(120)
        questions = [Question(question, passage) for question, passage in pairs]
        before = [await asyncio.to_thread(answers_by_replica, server.metrics_url) for server in servers]
        async with sender(client, "unary", 1, config.timeout_s) as send:
            samples = await closed_loop(send, questions, config.concurrency, load)
        after = [await asyncio.to_thread(answers_by_replica, server.metrics_url) for server in servers]
    summary = summarize(samples, config.duration_s)
    row = {
        "setup": label,
        "concurrency": config.concurrency,
        "throughput_rps": summary["throughput_rps"],
        "client_ms": summary["client_ms"],
        "codes": summary["codes"],
        "answers_per_server": [round(b - a) for a, b in zip(before, after, strict=True)],
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    log.info("%s: %.1f answers/s", label, row["throughput_rps"])
    return row


@dataclass
class Setup:
    """One topology under test: what the load generator dials and which servers' metrics count its answers."""

    label: str
    upstreams: list[str]  # behind nginx; empty: `direct` is dialed without nginx
    servers: list[StartedServer]
    direct: str | None = None


async def run(config: ScaleBenchConfig) -> list[dict[str, Any]]:
    """Every setup once per round, rounds interleaved, so drifting background load hits all setups alike."""
    pairs = load_questions(config.squad, config.questions)
    engine = config.engine
    if engine is None:
        from realtime_qa.builder.defaults import ensure_default_engine

        engine = await asyncio.to_thread(ensure_default_engine)
    common = ["--engine", str(engine), "--max-batch-size", "1", "--intra-op-threads", str(config.intra_op_threads)]
    started: list[StartedServer] = []
    rows: list[dict[str, Any]] = []
    try:
        replicas = []
        for _ in range(max(config.replicas)):
            replicas.append(await StartedServer.start(common))
            started.append(replicas[-1])
        for server in replicas:
            await wait_serving(server)
        setups = [Setup("1 replica, direct (baseline, no nginx)", [], replicas[:1], replicas[0].target)]
        for count in config.replicas:
            label = f"{count} replica{'s' if count > 1 else ''} via nginx"
            setups.append(Setup(label, [server.target for server in replicas[:count]], replicas[:count]))
        for workers in config.workers:
            server = await StartedServer.start([*common, "--workers", str(workers)])
            started.append(server)
            await wait_serving(server)
            setups.append(Setup(f"1 replica, --workers {workers}, via nginx", [server.target], [server]))
        # Round -1 is not counted: every server's first pass over the questions (new window lengths, passages
        # tokenized once) ran slower than later ones, and it would land on whichever setup comes first.
        for round_index in range(-1 if config.warmup_round else 0, config.rounds):
            for setup in setups:
                if setup.direct is not None:
                    row = await measure(setup.label, setup.direct, pairs, config, setup.servers)
                else:
                    async with nginx_in_front(setup.upstreams) as address:
                        row = await measure(setup.label, address, pairs, config, setup.servers)
                if round_index >= 0:
                    rows.append({**row, "round": round_index})
    finally:
        for server in started:
            await server.stop()
    return rows


def combine(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setup (in first-seen order): the median answers/s over rounds, every round's answers/s, and
    the latencies of the round closest to the median."""
    by_setup: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_setup.setdefault(row["setup"], []).append(row)
    combined = []
    for rounds in by_setup.values():
        median_rps = statistics.median(row["throughput_rps"] for row in rounds)
        closest = min(rounds, key=lambda row: abs(row["throughput_rps"] - median_rps))  # its latencies are shown
        combined.append(
            {**closest, "throughput_rps": round(median_rps, 2), "rounds_rps": [r["throughput_rps"] for r in rounds]}
        )
    return combined


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


def markdown_table(rows: list[dict[str, Any]]) -> str:
    baseline = rows[0]["throughput_rps"] if rows else 0.0
    header = (
        "| setup | answers/s (median of rounds) | each round | vs baseline | p50 ms | p99 ms | answers per server | "
        "errors | load avg |"
    )
    lines = table_head(header)
    for row in rows:
        client = row["client_ms"]
        ratio = row["throughput_rps"] / baseline if baseline else float("nan")
        lines.append(
            f"| {row['setup']} | {row['throughput_rps']:.1f} | {' / '.join(f'{v:.1f}' for v in row['rounds_rps'])} | "
            f"{ratio:.2f}x | {client.get('p50', float('nan')):.1f} | "
            f"{client.get('p99', float('nan')):.1f} | {' / '.join(str(n) for n in row['answers_per_server'])} | "
            f"{errors_cell(row['codes'])} | {row['load_avg_1m']} |"
        )
    return "\n".join(lines)


def _numbers(text: str) -> tuple[int, ...]:
    values = number_list(text)
    if not values or min(values) < 1 or max(values) > 8:
        raise argparse.ArgumentTypeError(f"expected integers in [1, 8], got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ScaleBenchConfig()
    add = parser.add_argument
    add("--engine", type=Path, help="engine directory (default: the shipped model's CPU engine)")
    add("--squad", type=Path, default=defaults.squad, help="SQuAD file with the questions (default: %(default)s)")
    add("--questions", type=int, default=defaults.questions, help="distinct questions, cycled")
    add("--replicas", type=_numbers, default=defaults.replicas, help="replica counts behind nginx, e.g. 1,2,3")
    add("--workers", type=_numbers, default=defaults.workers, help="qa-serve --workers values, e.g. 1,2")
    add("--concurrency", type=int, default=defaults.concurrency, help="closed-loop clients")
    add("--duration-s", type=float, default=defaults.duration_s, help="measured seconds per point")
    add("--warmup-s", type=float, default=defaults.warmup_s, help="unmeasured seconds before each point")
    add("--intra-op-threads", type=int, default=defaults.intra_op_threads, help="engine threads per call")
    add("--rounds", type=int, default=defaults.rounds, help="rounds over every setup, interleaved (median shown)")
    add(
        "--warmup-round",
        action=argparse.BooleanOptionalAction,
        default=defaults.warmup_round,
        help="run one unmeasured round over every setup first",
    )
    add("--json-out", type=Path, help="write the results as JSON here")
    add("--markdown-out", type=Path, help="write the results table as Markdown here")


def run_from_args(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if shutil.which("nginx") is None:
        print("qa-bench scale: needs nginx (Debian package nginx)", file=sys.stderr)
        return 2
    if not args.squad.is_file():
        print(f"qa-bench scale: SQuAD file not found: {args.squad}", file=sys.stderr)
        return 2
    if min(args.concurrency, args.questions, args.rounds) < 1 or args.duration_s <= 0 or args.warmup_s < 0:
        print("qa-bench scale: --concurrency, --questions, --rounds >= 1, --duration-s > 0, --warmup-s >= 0",
              file=sys.stderr)  # fmt: skip
        return 2
    config = ScaleBenchConfig(
        engine=args.engine,
        squad=args.squad,
        questions=args.questions,
        replicas=args.replicas,
        workers=args.workers,
        concurrency=args.concurrency,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        intra_op_threads=args.intra_op_threads,
        rounds=args.rounds,
        warmup_round=args.warmup_round,
    )
    load_before = uptime()
    all_rows = asyncio.run(run(config))
    rows = combine(all_rows)
    result = {
        "benchmark": "qa-bench scale",
        "machine": machine_description(),
        "uptime_before": load_before,
        "uptime_after": uptime(),
        "command": "qa-bench scale " + shlex.join(argv),
        "baseline": "1 replica reached directly (no nginx), same run",
        "limits": LIMITS_NOTE,
        "config": {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(config).items()},
        "results": rows,
        "all_rounds": all_rows,
    }
    table = markdown_table(rows)
    print(f"machine: {result['machine']}\nuptime: {load_before}\ncommand: {result['command']}\n\n{table}\n")
    print(LIMITS_NOTE)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.markdown_out is not None:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            "# qa-bench scale: replicas behind nginx and workers per replica (CPU engine)",
            f"machine: {result['machine']} (shared with other jobs)",
            f"uptime before: `{load_before}`; after: `{result['uptime_after']}`",
            f"command: `{result['command']}`",
            f"baseline: {result['baseline']}",
            table,
            f"What limits the ratio here: {LIMITS_NOTE}",
        ]
        args.markdown_out.write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    return 0
