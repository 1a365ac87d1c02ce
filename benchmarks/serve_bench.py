"""`qa-bench serve`: load generator for the gRPC QA service, in the manner of Triton's perf_analyzer.

Real questions (SQuAD dev) go to a server over unary calls or bidirectional streams, either in a
closed loop (N concurrent clients, each sending its next question when the last is answered) or in an
open loop (arrivals at a fixed rate, constant or Poisson, latency counted from the scheduled arrival
so a slow server cannot hide its queueing). Each point reports throughput, client-side p50/p90/p95/
p99 latency, the server's per-stage breakdown (from the timings in every response), error codes and
the mean batch size (from the server's Prometheus endpoint, when it has one).

Without --target the benchmark starts `qa-serve` itself (a separate process, as in production) on a
free port; `--compare-batching` runs the same sweep against a server with the batcher off (max
batch 1: the baseline) and on, in one run; `--variant LABEL=FLAGS` (repeatable) starts one server per
variant with those extra qa-serve flags instead, e.g. the event loops side by side. `--echo-floor` first
measures a bare grpc.aio echo (the transport floor) at the same levels, once per `--echo-event-loops`
loop. `--passages inline,ids` asks every point with the passage inline and by passage id.

    qa-bench serve --compare-batching --concurrency 1,8,32,128 --json-out benchmarks/results/serve_cpu.json
    qa-bench serve --target 127.0.0.1:50051 --mode open --rate 50,100 --arrivals poisson --api stream
    qa-bench serve --concurrency 1,32 --echo-floor --echo-event-loops asyncio,uvloop \
        --variant asyncio= --variant "uvloop=--event-loop uvloop"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import logging
import os
import random
import re
import shlex
import signal
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from realtime_qa.benchmarks.report import (
    errors_cell,
    loop_name,
    machine_description,
    number_list,
    percentile_summary,
    table_head,
)
from realtime_qa.pipeline.client import (
    Answer,
    AnswerFailure,
    ClientConfig,
    QAClient,
    QAClientError,
    QAStream,
    Question,
    RetryPolicy,
)
from realtime_qa.qacore.latency import STAGES, StageTimings
from realtime_qa.services.config import EVENT_LOOPS

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SQUAD = REPO.parent / "shared" / "data" / "squad" / "dev-v1.1.json.gz"
LISTENING = re.compile(r"listening on (\S+):(\d+)")
METRICS = re.compile(r"metrics on http://(\S+):(\d+)/metrics")


@dataclass(frozen=True)
class ServeBenchConfig:
    target: str | None = None  # a running server; None: start qa-serve here
    engine: Path | None = None  # engine for the started server (None: the default engine)
    squad: Path = DEFAULT_SQUAD
    questions: int = 1000  # distinct SQuAD questions, cycled
    seed_question: bool = False  # ask only the example question on the example passage (as `qa-bench cpu` does)
    mode: str = "closed"  # "closed" | "open"
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    rates: tuple[float, ...] = (20.0,)  # open loop: requests per second
    arrivals: str = "poisson"  # "constant" | "poisson"
    apis: tuple[str, ...] = ("unary",)  # each point over unary `Answer` calls and/or `AnswerStream`
    streams: int = 8  # open loop over streams: this many streams share the arrivals
    passage_forms: tuple[str, ...] = ("inline",)  # "inline": text in every question; "ids": PutPassage first
    duration_s: float = 10.0  # measured time per point
    warmup_s: float = 3.0  # unmeasured time before each point
    max_batch_size: int = 16  # batching-on setting of started servers
    max_queue_delay_us: int = 1000
    compare_batching: bool = False
    server_args: tuple[str, ...] = ()  # extra qa-serve flags for started servers
    variants: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (label, extra qa-serve flags): one started server each
    echo_event_loops: tuple[str, ...] = ("asyncio",)  # --echo-floor: the echo server's event loop(s)
    client_event_loop: str = "auto"  # the load generator's own loop (and the echo client's): auto = uvloop if installed
    cpu_steps: bool = True  # time the service's CPU steps in process first (started servers only)
    timeout_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("closed", "open"):
            raise ValueError(f"--mode must be closed or open, got {self.mode!r}")
        if not self.apis or not set(self.apis) <= {"unary", "stream"}:
            raise ValueError(f"--api must list unary and/or stream, got {','.join(self.apis)!r}")
        if self.client_event_loop not in EVENT_LOOPS:
            raise ValueError(
                f"--client-event-loop must be one of {', '.join(EVENT_LOOPS)}, got {self.client_event_loop!r}"
            )
        if self.arrivals not in ("constant", "poisson"):
            raise ValueError(f"--arrivals must be constant or poisson, got {self.arrivals!r}")
        if self.compare_batching and self.target is not None:
            raise ValueError("--compare-batching starts its own servers; it cannot be used with --target")
        if self.variants and (self.target is not None or self.compare_batching):
            raise ValueError("--variant starts its own servers; it cannot be used with --target or --compare-batching")
        if len({label for label, _ in self.variants}) != len(self.variants):
            raise ValueError("--variant labels must differ")
        if not self.passage_forms or not set(self.passage_forms) <= {"inline", "ids"}:
            raise ValueError(f"--passages must list inline and/or ids, got {','.join(self.passage_forms)!r}")
        if not self.echo_event_loops or not set(self.echo_event_loops) <= {"asyncio", "uvloop"}:
            raise ValueError(f"--echo-event-loops must list asyncio and/or uvloop, got {self.echo_event_loops!r}")
        if any(c < 1 for c in self.concurrency) or any(r <= 0 for r in self.rates):
            raise ValueError("concurrency levels and rates must be positive")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.questions < 1:
            raise ValueError("--duration-s must be > 0, --warmup-s >= 0, --questions >= 1")


@dataclass
class Samples:
    """What the measured window of one point saw."""

    latencies_ns: list[int] = field(default_factory=list)
    timings: list[StageTimings] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)

    def add(self, latency_ns: int, result: Answer | AnswerFailure | QAClientError) -> None:
        if isinstance(result, Answer):
            self.codes["OK"] += 1
            self.latencies_ns.append(latency_ns)
            self.timings.append(result.timings)
        else:
            self.codes[result.code.name] += 1


# -- questions and servers ----------------------------------------------------------------------------


def seed_question() -> list[tuple[str, str]]:
    """The example question on the example passage: what `qa-assistant --demo` asks first and `qa-bench cpu`
    times, so the gRPC figure and the in-process one are of the same question."""
    from realtime_qa.pipeline.assistant_cli import DEMO_PASSAGE, DEMO_QUESTIONS

    return [(DEMO_QUESTIONS[0], DEMO_PASSAGE)]


def benchmark_questions(config: ServeBenchConfig, limit: int) -> list[tuple[str, str]]:
    return seed_question() if config.seed_question else load_questions(config.squad, limit)


def load_questions(path: Path, limit: int) -> list[tuple[str, str]]:
    from realtime_qa.qacore.squad import read_dataset

    dataset = read_dataset(path)
    pairs = [(question.question, paragraph.context) for paragraph, question in dataset.questions(limit=limit)]
    if not pairs:
        raise ValueError(f"no questions in {path}")
    return pairs


class StartedServer:
    """`qa-serve --port 0` in a subprocess, with its metrics endpoint on a free port."""

    def __init__(self, process: asyncio.subprocess.Process, command: list[str]) -> None:
        self.process = process
        self.command = command
        self.target = ""
        self.metrics_url: str | None = None
        self.lines: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, args: Sequence[str], timeout_s: float = 600.0) -> StartedServer:
        script = Path(sys.executable).parent / "qa-serve"
        base = [str(script)] if script.is_file() else [sys.executable, "-m", "realtime_qa.services.cli"]
        command = [*base, "--port", "0", "--metrics-port", "0", *args]
        process = await asyncio.create_subprocess_exec(
            *command, cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        server = cls(process, command)
        await asyncio.wait_for(server._wait_listening(), timeout_s)
        server._drain = asyncio.create_task(server._read_rest())
        return server

    async def _wait_listening(self) -> None:
        assert self.process.stderr is not None
        while not (self.target and self.metrics_url):
            raw = await self.process.stderr.readline()
            if not raw:
                raise RuntimeError("qa-serve exited during start-up:\n" + "\n".join(self.lines[-20:]))
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if match := LISTENING.search(line):
                self.target = f"{match.group(1)}:{match.group(2)}"
            if match := METRICS.search(line):
                self.metrics_url = f"http://{match.group(1)}:{match.group(2)}/metrics"

    async def _read_rest(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip())

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 60)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await self._drain


def scrape_batches(metrics_url: str | None) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram, summed over models."""
    if metrics_url is None:
        return 0.0, 0.0
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("qa_batch_size_windows_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("qa_batch_size_windows_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


# -- load ---------------------------------------------------------------------------------------------

Send = Callable[[Question], Awaitable[Answer | AnswerFailure]]


class StreamPool:
    """Questions spread over a few open streams; answers matched to callers by request id."""

    def __init__(self, client: QAClient, size: int) -> None:
        self.streams: list[QAStream] = [client.open_stream() for _ in range(size)]
        self.waiting: dict[str, asyncio.Future[Answer | AnswerFailure]] = {}
        self.readers = [asyncio.create_task(self._read(stream)) for stream in self.streams]
        self.ids = itertools.count()
        self.next_stream = itertools.cycle(self.streams)

    async def _read(self, stream: QAStream) -> None:
        try:
            async for result in stream:
                future = self.waiting.pop(result.request_id, None)
                if future is not None and not future.done():
                    future.set_result(result)
        except QAClientError as exc:
            for future in list(self.waiting.values()):
                if not future.done():
                    future.set_exception(exc)

    async def ask(self, question: Question) -> Answer | AnswerFailure:
        tag = str(next(self.ids))
        future: asyncio.Future[Answer | AnswerFailure] = asyncio.get_running_loop().create_future()
        self.waiting[tag] = future
        await next(self.next_stream).send(Question(question.question, question.passage, question.passage_id, tag))
        return await future

    async def close(self) -> None:
        for stream in self.streams:
            with contextlib.suppress(Exception):
                await stream.done_sending()
        await asyncio.gather(*self.readers, return_exceptions=True)


@contextlib.asynccontextmanager
async def sender(client: QAClient, api: str, streams: int, timeout_s: float) -> AsyncIterator[Send]:
    if api == "unary":

        async def unary(question: Question) -> Answer:
            return await client.answer(question, timeout_s=timeout_s)

        yield unary
        return
    pool = StreamPool(client, streams)
    try:
        yield pool.ask
    finally:
        await pool.close()


async def _timed(send: Send, question: Question, started_ns: int) -> tuple[int, Answer | AnswerFailure | QAClientError]:
    try:
        result: Answer | AnswerFailure | QAClientError = await send(question)
    except QAClientError as exc:
        result = exc
    return time.perf_counter_ns() - started_ns, result


async def closed_loop(send: Send, questions: list[Question], concurrency: int, config: ServeBenchConfig) -> Samples:
    """`concurrency` clients, each asking its next question as soon as the last one is answered."""
    samples = Samples()
    begin = time.perf_counter_ns()
    measure_from = begin + int(config.warmup_s * 1e9)
    measure_to = measure_from + int(config.duration_s * 1e9)

    async def client_loop(worker: int) -> None:
        for index in itertools.count(worker, concurrency):
            started = time.perf_counter_ns()
            if started >= measure_to:
                return
            latency, result = await _timed(send, questions[index % len(questions)], started)
            # Counted when it completes inside the window: throughput is the completion rate there.
            if measure_from <= started + latency <= measure_to:
                samples.add(latency, result)

    await asyncio.gather(*(client_loop(worker) for worker in range(concurrency)))
    return samples


async def open_loop(send: Send, questions: list[Question], rate: float, config: ServeBenchConfig) -> Samples:
    """Arrivals at `rate` per second whatever the server does; latency from each scheduled arrival."""
    samples = Samples()
    rng = random.Random(config.seed)
    begin = time.perf_counter_ns()
    measure_from = begin + int(config.warmup_s * 1e9)
    measure_to = measure_from + int(config.duration_s * 1e9)
    tasks: list[asyncio.Task[None]] = []

    async def arrival(question: Question, scheduled: int) -> None:
        latency, result = await _timed(send, question, scheduled)
        if measure_from <= scheduled + latency <= measure_to:
            samples.add(latency, result)

    scheduled = begin
    for index in itertools.count():
        if scheduled >= measure_to:
            break
        delay = (scheduled - time.perf_counter_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(arrival(questions[index % len(questions)], scheduled)))
        gap = rng.expovariate(rate) if config.arrivals == "poisson" else 1.0 / rate
        scheduled += int(gap * 1e9)
    await asyncio.gather(*tasks)
    return samples


def summarize(samples: Samples, duration_s: float) -> dict[str, Any]:
    latencies_ms = np.asarray(samples.latencies_ns, dtype=np.float64) / 1e6
    server = {
        stage: percentile_summary(np.asarray([t.stage_ns(stage) for t in samples.timings], dtype=np.float64) / 1e6)
        for stage in (*STAGES, "total")
    }
    return {
        "answered": len(samples.latencies_ns),
        "throughput_rps": round(len(samples.latencies_ns) / duration_s, 2),
        "client_ms": percentile_summary(latencies_ms),
        "server_ms": server,
        "codes": dict(samples.codes),
    }


@dataclass
class Target:
    """One server under test: where it is, its label in the results, its prepared questions by passage form."""

    label: str
    client: QAClient
    metrics_url: str | None
    batching: str = "on"  # "on", "off" (max batch 1) or "external" (a running server's own setting)
    questions: dict[str, list[Question]] = field(default_factory=dict)


async def prepare(target: Target, pairs: list[tuple[str, str]], config: ServeBenchConfig) -> None:
    await target.client.wait_ready(600)
    if "inline" in config.passage_forms:
        target.questions["inline"] = [Question(q, passage) for q, passage in pairs]
    if "ids" in config.passage_forms:
        stored = {p: (await target.client.put_passage(p)).passage_id for p in {passage for _, passage in pairs}}
        target.questions["ids"] = [Question(q, passage_id=stored[passage]) for q, passage in pairs]


async def run_point(
    target: Target, kind: str, value: float, config: ServeBenchConfig, passages: str = "inline", api: str = "unary"
) -> dict[str, Any]:
    # Closed loop over streams: one stream per concurrent client, one question in flight on each.
    streams = int(value) if kind == "concurrency" else config.streams
    before = await asyncio.to_thread(scrape_batches, target.metrics_url)
    questions = target.questions[passages]
    # The questions and the client's modules live for the whole run: a full collection walking them paused
    # the load generator for up to 23 ms (profile_h200.md), which would be counted as the server's latency.
    gc.collect()
    gc.freeze()
    async with sender(target.client, api, streams, config.timeout_s) as send:
        if kind == "concurrency":
            samples = await closed_loop(send, questions, int(value), config)
        else:
            samples = await open_loop(send, questions, value, config)
    after = await asyncio.to_thread(scrape_batches, target.metrics_url)
    batches = after[1] - before[1]
    row = {
        "server": target.label,
        "batching": target.batching,
        "passages": passages,
        "api": api,
        kind: value,
        **summarize(samples, config.duration_s),
        "mean_batch_windows": round((after[0] - before[0]) / batches, 2) if batches else None,
        "client_loop": loop_name(),
        # Other work on a shared host skews every number: the 1-minute load average says how much.
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    log.info("%s %s=%s (%s, %s): %.1f answers/s", target.label, kind, value, passages, api, row["throughput_rps"])
    return row


async def run(config: ServeBenchConfig) -> list[dict[str, Any]]:
    """Every point against every target; targets alternate point by point, so drifting background load
    on a shared machine affects the baseline and the batcher alike."""
    pairs = benchmark_questions(config, config.questions)
    retry_off = ClientConfig(retry=RetryPolicy(max_attempts=1), timeout_s=config.timeout_s)
    started: list[StartedServer] = []
    targets: list[Target] = []
    try:
        if config.target is not None:
            targets.append(Target("external", QAClient(config.target, retry_off), None, "external"))
        else:
            # (label, batching, max batch, extra flags) of each server to start
            settings: list[tuple[str, str, int, tuple[str, ...]]] = (
                [(label, "on", config.max_batch_size, flags) for label, flags in config.variants]
                if config.variants
                else [("off", "off", 1, ()), ("on", "on", config.max_batch_size, ())]
                if config.compare_batching
                else [("on", "on", config.max_batch_size, ())]
            )
            for label, batching, max_batch, flags in settings:
                args = ["--max-batch-size", str(max_batch), "--max-queue-delay-us", str(config.max_queue_delay_us)]
                if config.engine is not None:
                    args += ["--engine", str(config.engine)]
                server = await StartedServer.start([*args, *config.server_args, *flags])
                started.append(server)
                targets.append(Target(label, QAClient(server.target, retry_off), server.metrics_url, batching))
        for target in targets:
            await prepare(target, pairs, config)
        points: list[tuple[str, float]] = (
            [("concurrency", c) for c in config.concurrency]
            if config.mode == "closed"
            else [("rate_rps", r) for r in config.rates]
        )
        rows = [
            await run_point(target, kind, value, config, passages, api)
            for api in config.apis
            for passages in config.passage_forms
            for kind, value in points
            for target in targets
        ]
    finally:
        for target in targets:
            await target.client.close()
        for server in started:
            await server.stop()
    # Grouped by target for the table: baseline rows first.
    order = {target.label: index for index, target in enumerate(targets)}
    return sorted(rows, key=lambda row: order[row["server"]])


def measure_cpu_offload(engine_dir: Path, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Median microseconds of the service's CPU steps inline and through a one-thread executor.

    Decides what the service runs on the event loop: work much cheaper than the thread hop stays inline.
    """
    from concurrent.futures import ThreadPoolExecutor

    from realtime_qa.qacore.answerer import QuestionAnswerer
    from realtime_qa.qacore.decoding import decode

    with QuestionAnswerer.from_engine_dir(engine_dir) as answerer:
        featurizer = answerer.featurizer
        encoded = {passage: featurizer.encode_passage(passage) for _, passage in pairs}

        def question_windows(question: str, passage: str) -> object:
            return featurizer.windows(featurizer.encode_question(question), encoded[passage])

        def median_us(step: Callable[[str, str], object]) -> float:
            times = []
            for question, passage in pairs:
                begin = time.perf_counter_ns()
                step(question, passage)
                times.append(time.perf_counter_ns() - begin)
            return round(float(np.median(times)) / 1e3, 1)

        with ThreadPoolExecutor(max_workers=1) as pool:
            hop = median_us(lambda q, p: pool.submit(int).result())
            via_pool = median_us(lambda q, p: pool.submit(question_windows, q, p).result())
        features = [featurizer.featurize(question, passage) for question, passage in pairs[:100]]
        outputs = [answerer.engine.infer(featurizer.batch(f.windows)) for f in features]
        decode_times = []
        for feature, output in zip(features, outputs, strict=True):
            begin = time.perf_counter_ns()
            decode(feature, output.start_logits, output.end_logits, answerer.decoder_config)
            decode_times.append((time.perf_counter_ns() - begin) / len(feature.windows))
        return {
            "question_tokenize_inline_us": median_us(question_windows),
            "question_tokenize_executor_us": via_pool,
            "executor_hop_us": hop,
            "passage_tokenize_inline_us": median_us(lambda q, p: featurizer.encode_passage(p)),
            "decode_per_window_us": round(float(np.median(decode_times)) / 1e3, 1),
        }


# -- reporting ----------------------------------------------------------------------------------------


def markdown_table(rows: list[dict[str, Any]]) -> str:
    kind = "concurrency" if rows and "concurrency" in rows[0] else "rate_rps"
    header = (
        f"| server | {kind} | passages | api | answers/s | p50 ms | p90 ms | p95 ms | p99 ms | "
        "server queue p50 | tokenize p50 | infer p50 | decode p50 | total p50 | mean batch | errors | load avg |"
    )
    lines = table_head(header)
    nan = float("nan")
    for row in rows:
        client, server = row["client_ms"], row["server_ms"]
        lines.append(
            f"| {row['server']} | {row[kind]:g} | {row['passages']} | {row['api']} | {row['throughput_rps']:.1f} | "
            f"{client.get('p50', nan):.2f} | {client.get('p90', nan):.2f} | "
            f"{client.get('p95', nan):.2f} | {client.get('p99', nan):.2f} | "
            f"{server['queue'].get('p50', nan):.2f} | {server['tokenize'].get('p50', nan):.2f} | "
            f"{server['infer'].get('p50', nan):.2f} | {server['decode'].get('p50', nan):.2f} | "
            f"{server['total'].get('p50', nan):.2f} | {row['mean_batch_windows'] or '-'} | "
            f"{errors_cell(row['codes'])} | {row['load_avg_1m']} |"
        )
    return "\n".join(lines)


def report(
    config: ServeBenchConfig, rows: list[dict[str, Any]], argv: Sequence[str], offload: dict[str, float] | None
) -> dict[str, Any]:
    return {
        "benchmark": "qa-bench serve",
        "machine": machine_description(),
        "command": "qa-bench serve " + shlex.join(argv),
        "baseline": "batcher off (max batch size 1), same run"
        if config.compare_batching
        else f"first variant ({config.variants[0][0]}), same run"
        if config.variants
        else None,
        "config": {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(config).items()},
        "results": rows,
        "cpu_offload": offload,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServeBenchConfig()
    add = parser.add_argument
    add("--target", help="HOST:PORT of a running server (default: start qa-serve here)")
    add("--engine", type=Path, help="engine directory for the started server (default: the shipped model's)")
    add("--squad", type=Path, default=defaults.squad, help="SQuAD file with the questions (default: %(default)s)")
    add("--questions", type=int, default=defaults.questions, help="distinct questions, cycled")
    add(
        "--seed-question",
        action="store_true",
        help="ask only the example question on the example passage (the one `qa-bench cpu` times), not SQuAD",
    )
    add(
        "--mode",
        choices=("closed", "open"),
        default=defaults.mode,
        help="closed loop (concurrency) or open loop (rate)",
    )
    add("--concurrency", type=number_list, default=defaults.concurrency, help="closed loop levels, e.g. 1,8,32,128")
    add("--rate", type=lambda t: number_list(t, float), default=defaults.rates, help="open loop requests/s, e.g. 10,50")
    add("--arrivals", choices=("constant", "poisson"), default=defaults.arrivals, help="open loop arrival process")
    add(
        "--api",
        type=lambda text: tuple(part for part in text.split(",") if part),
        default=defaults.apis,
        help="unary Answer calls, AnswerStream, or both at every point: unary, stream, or unary,stream",
    )
    add(
        "--client-event-loop",
        choices=EVENT_LOOPS,
        default=defaults.client_event_loop,
        help="the load generator's event loop (and the echo floor's client): auto = uvloop where installed",
    )
    add("--streams", type=int, default=defaults.streams, help="open loop over streams: number of streams")
    add("--passage-ids", action="store_true", help="PutPassage first, then ask by passage id (= --passages ids)")
    add(
        "--passages",
        type=lambda text: tuple(part for part in text.split(",") if part),
        help="passage forms to ask with, each at every point: inline, ids, or inline,ids (default: inline)",
    )
    add("--duration-s", type=float, default=defaults.duration_s, help="measured seconds per point")
    add("--warmup-s", type=float, default=defaults.warmup_s, help="unmeasured seconds before each point")
    add("--max-batch-size", type=int, default=defaults.max_batch_size, help="batcher-on max batch of started servers")
    add("--max-queue-delay-us", type=int, default=defaults.max_queue_delay_us, help="batcher delay of started servers")
    add("--compare-batching", action="store_true", help="run the sweep with the batcher off (baseline) and on")
    add("--server-arg", action="append", default=[], help="extra qa-serve flag for started servers (repeatable)")
    add(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=FLAGS",
        help="start one server per variant with these extra qa-serve flags (repeatable; the first is the baseline), "
        "e.g. --variant asyncio= --variant 'uvloop=--event-loop uvloop'",
    )
    add(
        "--echo-event-loops",
        type=lambda text: tuple(part for part in text.split(",") if part),
        default=("asyncio",),
        help="--echo-floor: measure the echo under each of these server event loops (asyncio,uvloop)",
    )
    add("--no-cpu-steps", action="store_true", help="skip timing the service's CPU steps in process first")
    add("--json-out", type=Path, help="write the results as JSON here")
    add("--markdown-out", type=Path, help="write the results table as Markdown here")
    add("--echo-floor", action="store_true", help="first measure a bare grpc.aio echo at the same concurrency levels")


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    return ServeBenchConfig(
        target=args.target,
        engine=args.engine,
        squad=args.squad,
        questions=args.questions,
        seed_question=args.seed_question,
        mode=args.mode,
        concurrency=tuple(args.concurrency),
        rates=tuple(args.rate),
        arrivals=args.arrivals,
        apis=args.api,
        client_event_loop=args.client_event_loop,
        streams=args.streams,
        passage_forms=args.passages or (("ids",) if args.passage_ids else ("inline",)),
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        compare_batching=args.compare_batching,
        server_args=tuple(arg for extra in args.server_arg for arg in shlex.split(extra)),
        variants=tuple(_variant(text) for text in args.variant),
        echo_event_loops=tuple(args.echo_event_loops),
        cpu_steps=not args.no_cpu_steps,
    )


def _variant(text: str) -> tuple[str, tuple[str, ...]]:
    label, sep, flags = text.partition("=")
    if not sep or not label:
        raise ValueError(f"--variant must be LABEL=FLAGS, got {text!r}")
    return label, tuple(shlex.split(flags))


def run_from_args(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"qa-bench serve: {exc}", file=sys.stderr)
        return 2
    if not config.seed_question and not config.squad.is_file():
        print(f"qa-bench serve: SQuAD file not found: {config.squad}", file=sys.stderr)
        return 2
    offload = None
    if config.target is None and config.cpu_steps:  # measured first: it is quick, and the engine is local
        from realtime_qa.builder.defaults import ensure_default_engine

        pairs = benchmark_questions(config, min(config.questions, 500))
        offload = measure_cpu_offload(config.engine or ensure_default_engine(), pairs)
    echo_rows = None
    from realtime_qa.services.cli import EventLoopUnavailable, event_loop_factory

    try:
        client_loop = event_loop_factory(config.client_event_loop)
    except EventLoopUnavailable as exc:
        print(f"qa-bench serve: {str(exc).replace('--event-loop', '--client-event-loop')}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=client_loop) as runner:
        if args.echo_floor:  # the transport floor, same run, same levels and APIs (benchmarks.grpc_echo)
            from realtime_qa.benchmarks import grpc_echo

            echo_rows = [
                row
                for loop in config.echo_event_loops
                for row in runner.run(
                    grpc_echo.measure(config.concurrency, config.duration_s, config.warmup_s, loop, config.apis)
                )
            ]
        rows = runner.run(run(config))
    result = report(config, rows, argv, offload)
    if echo_rows is not None:
        result["echo_floor"] = echo_rows
        table = grpc_echo.markdown_table(echo_rows) + "\n\n"
    else:
        table = ""
    table += markdown_table(rows)
    print(f"machine: {result['machine']}\ncommand: {result['command']}\n")
    print(table)
    if offload is not None:
        print("\nCPU steps (median us): " + ", ".join(f"{key} {value}" for key, value in offload.items()))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.markdown_out is not None:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"machine: {result['machine']}", f"command: `{result['command']}`"]
        if result["baseline"]:
            lines.append(f"baseline: {result['baseline']}")
        footer = ""
        if offload is not None:
            footer = "\nCPU steps (median us): " + ", ".join(f"{key} {value}" for key, value in offload.items()) + "\n"
        args.markdown_out.write_text("\n\n".join(lines) + "\n\n" + table + "\n" + footer, encoding="utf-8")
    return 0
