"""`qa-bench pipeline`: per-stage latency of the conversational chain, against the QA call alone.

A scripted conversation (SQuAD dev paragraphs as passages, their questions as text turns; one session
per paragraph) goes through the whole chain (`assistant.v1` front, ASR stub, QA, response) in one
process and split (each stage its own process on loopback), one turn at a time: the next turn is sent
when the previous turn's latency report has arrived, so every figure is a turn's own latency, not
queueing behind earlier turns. Every `TurnReport` is folded into a `LatencyBoard`, the dashboard's own
object, so the percentiles and over-budget rates here are computed exactly as `/api/latency` does.

The baseline, in the same run and interleaved with the chain: right before each turn, the same
question on the same passage goes straight to the chain's own QA server (a `QAServer`, what `qa-serve`
runs, with the same engine) over gRPC on loopback, so both meet the same engine under the same machine
load. Its round trips and server timings go through the same `TurnRecorder` and board as the chain's
`qa` rows: `qa` of the chain minus `qa` of the baseline is what the chain adds to the language model's
call, and `turn` is what the user waits for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from realtime_qa.benchmarks.report import machine_description, percentile_summary
from realtime_qa.pipeline.board import BoardConfig, LatencyBoard, board_stage_names
from realtime_qa.qacore.latency import (
    LANGUAGE_MODEL_BUDGET_NS,
    QA_SERVER_STAGES,
    Budgets,
    TurnRecorder,
    TurnReport,
    parse_budgets,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SQUAD = REPO.parent / "shared" / "data" / "squad" / "dev-v1.1.json.gz"
RESULTS = REPO / "benchmarks" / "results"
MODES = ("one-process", "split")
SESSION_TIMEOUT_S = 300.0  # one scripted session, at most (a stuck chain fails the benchmark, never hangs it)


@dataclass(frozen=True)
class PipelineBenchConfig:
    squad: Path = DEFAULT_SQUAD
    paragraphs: int = 10  # sessions: the first paragraphs of the dev set with at least `questions` questions
    questions: int = 5  # turns per session
    rounds: int = 2  # the conversation is replayed this many times per mode
    warmup_turns: int = 5  # unmeasured turns (and baseline calls) before each mode
    modes: tuple[str, ...] = MODES
    engine: Path | None = None  # None: the shipped model's default CPU engine
    budgets: Budgets = field(default_factory=Budgets)
    json_out: Path = RESULTS / "pipeline_cpu.json"
    markdown_out: Path = RESULTS / "pipeline_cpu.md"

    def __post_init__(self) -> None:
        if min(self.paragraphs, self.questions, self.rounds) < 1 or self.warmup_turns < 0:
            raise ValueError("paragraphs, questions and rounds must be >= 1, warm-up turns >= 0")
        unknown = set(self.modes) - set(MODES)
        if unknown or not self.modes:
            raise ValueError(f"modes must be among {', '.join(MODES)}")


Script = list[tuple[str, list[str]]]  # (passage, its questions): one session each


def load_script(path: Path, paragraphs: int, questions: int) -> Script:
    from realtime_qa.qacore.squad import read_dataset

    script: Script = []
    for article in read_dataset(path).articles:
        for paragraph in article.paragraphs:
            if len(paragraph.questions) >= questions:
                script.append((paragraph.context, [q.question for q in paragraph.questions[:questions]]))
                if len(script) == paragraphs:
                    return script
    if not script:
        raise ValueError(f"no paragraph in {path} has {questions} questions")
    return script


class ReportCollector:
    """The chain's report sink: every turn's report, folded into a board as the dashboard would."""

    def __init__(self, budgets: Budgets, window: int) -> None:
        self.budgets = budgets
        self.window = window
        self.info: dict[str, str] = {}
        self.reset()

    def reset(self) -> None:
        self.reports: list[TurnReport] = []
        self.board = LatencyBoard(BoardConfig(window=self.window, recent_turns=1, budgets=self.budgets))

    def record(self, report: TurnReport) -> None:
        self.reports.append(report)
        self.board.record(report)

    def set_info(self, info: dict[str, Any]) -> None:
        self.info = {str(key): str(value) for key, value in info.items()}


# -- the chain ---------------------------------------------------------------------------------------


async def converse(
    target: str, passage: str, questions: Sequence[str], before_each: BaselineCall | None = None
) -> list[float]:
    """One session, closed loop: each question is sent once the previous turn's report has arrived
    (and, with `before_each`, once the same question went straight to the QA server).

    Returns the client's view of each turn (question sent to report received), in milliseconds.
    """
    import grpc

    from realtime_qa.assistant.v1 import assistant_pb2, assistant_pb2_grpc

    reported: asyncio.Queue[None] = asyncio.Queue()
    sent_ns: list[int] = []
    waits_ms: list[float] = []

    async def requests() -> Any:
        yield assistant_pb2.ConverseRequest(config=assistant_pb2.SessionConfig(passage=passage))
        for question in questions:
            if before_each is not None:
                await before_each(question, passage)
            sent_ns.append(time.perf_counter_ns())
            yield assistant_pb2.ConverseRequest(text=assistant_pb2.TextTurn(text=question))
            await reported.get()

    async with grpc.aio.insecure_channel(target) as channel:
        call = assistant_pb2_grpc.AssistantStub(channel).Converse(requests())
        async for event in call:
            if event.WhichOneof("event") == "report":
                waits_ms.append((time.perf_counter_ns() - sent_ns[len(waits_ms)]) / 1e6)
                reported.put_nowait(None)  # the last one ends the requests: the session closes normally
    if len(waits_ms) != len(questions):
        raise RuntimeError(f"the chain reported {len(waits_ms)} of {len(questions)} turns")
    return waits_ms


BaselineCall = Callable[[str, str], Awaitable[None]]


def baseline_call(client: Any, collector: ReportCollector, budgets: Budgets) -> BaselineCall:
    """The QA call alone: one question straight to the QA server, recorded as a turn with only `qa`."""

    async def call(question: str, passage: str) -> None:
        begin = time.perf_counter_ns()
        answer = await client.answer(question, passage)
        end = time.perf_counter_ns()
        recorder = TurnRecorder(len(collector.reports), "baseline", budgets, start_ns=begin)
        timings = answer.timings
        stages = {name: timings.stage_ns(name) for name in QA_SERVER_STAGES.names}
        recorder.record_remote("qa", begin, end, stages, timings.total_ns)
        collector.record(recorder.finish(end_ns=end))

    return call


async def measure(config: PipelineBenchConfig, mode: str, engine: Path, script: Script) -> dict[str, Any]:
    """The chain in `mode`, each turn preceded by its baseline: the same question straight to the chain's
    own QA server (a `QAServer`, as `qa-serve` runs it), so both see the same engine at the same moment."""
    from realtime_qa.pipeline.client import QAClient
    from realtime_qa.pipeline.launcher import ChainConfig, start_chain

    turns = len(script) * config.questions * config.rounds
    chain_reports = ReportCollector(config.budgets, window=turns)
    baseline_reports = ReportCollector(config.budgets, window=turns)
    chain_config = ChainConfig(
        engine_dir=engine, split=mode == "split", assistant_port=0, dashboard_port=None, budgets=config.budgets
    )
    client_ms: list[float] = []
    async with start_chain(chain_config, board=chain_reports) as chain, QAClient(chain.qa_target) as qa:
        before_each = baseline_call(qa, baseline_reports, config.budgets)
        left = config.warmup_turns
        for passage, questions in script:
            if left <= 0:
                break
            await converse(chain.assistant_target, passage, questions[:left], before_each)
            left -= len(questions[:left])
        chain_reports.reset()
        baseline_reports.reset()
        began = time.perf_counter_ns()
        async with asyncio.timeout(SESSION_TIMEOUT_S * len(script) * config.rounds):
            for _ in range(config.rounds):
                for passage, questions in script:
                    client_ms += await converse(chain.assistant_target, passage, questions, before_each)
        elapsed_s = (time.perf_counter_ns() - began) / 1e9
    result = summarize(chain_reports.board, board_stage_names(), chain_reports.reports)
    result.update(
        {
            "turns_per_s": round(len(chain_reports.reports) / elapsed_s, 2),
            "client_turn_ms": percentile_summary(np.asarray(client_ms)),
            "info": chain_reports.info,
            "errors": dict(Counter(r.error for r in chain_reports.reports if r.error is not None).most_common(5)),
        }
    )
    qa_rows = ("qa", *(name for name in board_stage_names() if name.startswith("qa.")))
    baseline = summarize(baseline_reports.board, qa_rows, baseline_reports.reports)
    adds = chain_cost(chain_reports.reports, baseline_reports.reports)
    return {"chain": result, "baseline": baseline, "chain_adds": adds}


# -- figures -----------------------------------------------------------------------------------------


def summarize(board: LatencyBoard, names: Sequence[str], reports: Sequence[TurnReport]) -> dict[str, Any]:
    """The board's rows (exact percentiles over every measured turn) as the JSON of one mode, plus the
    share of QA calls over the language model's 10 ms budget whatever budgets the run was given."""
    stages = {}
    for name in names:
        row = board.stage_summary(name)
        if row["window"] == 0:
            continue
        stages[name] = {
            key: row[key]
            for key in ("budget_ms", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms", "over_budget_rate", "window")
        }
    beyond = [report.total_ns - qa_server_ns(report) for report in reports]
    qa_spans = [span for report in reports if (span := report.span("qa")) is not None]
    over_lm = (
        sum(span.duration_ns > LANGUAGE_MODEL_BUDGET_NS for span in qa_spans) / len(qa_spans) if qa_spans else None
    )
    return {
        "turns": board.snapshot()["turns"],
        "stages": stages,
        "qa_over_10ms_rate": over_lm,
        "beyond_qa_server_ms": percentile_summary(np.asarray(beyond) / 1e6),
    }


def qa_server_ns(report: TurnReport) -> int:
    """The QA server's own time in a turn (its stage rows, without the network gap around them)."""
    return sum(span.duration_ns for span in report.spans if span.parent == "qa" and span.name != "qa.network")


def _cell(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def markdown_table(mode: str, chain: dict[str, Any], baseline: dict[str, Any]) -> str:
    lines = [
        f"{mode}: {chain['turns']['total']} turns ({chain['turns']['error']} errors), {chain['turns_per_s']} turns/s; "
        f"baseline: the same {baseline['turns']['total']} questions straight to the QA server, each before its turn",
        "",
        "stage | budget ms | p50 ms | p95 ms | p99 ms | over budget | baseline p50 | baseline p95 | baseline p99 "
        "| baseline over budget",
        "---|---:|---:|---:|---:|---:|---:|---:|---:|---:",
    ]
    for name, row in chain["stages"].items():
        base = baseline["stages"].get(name, {})
        lines.append(
            f"{name} | {_cell(row['budget_ms'], 0)} | {_cell(row['p50_ms'])} | {_cell(row['p95_ms'])} | "
            f"{_cell(row['p99_ms'])} | {_rate(row['over_budget_rate'])} | {_cell(base.get('p50_ms'))} | "
            f"{_cell(base.get('p95_ms'))} | {_cell(base.get('p99_ms'))} | {_rate(base.get('over_budget_rate'))}"
        )
    client = chain["client_turn_ms"]
    if chain["errors"]:
        failures = "; ".join(f"{count} x {message}" for message, count in chain["errors"].items())
        lines += [
            "",
            f"Failed turns: {failures} (the QA budget is also the QA call's deadline: `--budgets qa=...` moves both)",
        ]
    lines += [
        "",
        f"client's view of a turn (text sent to report received): p50 {client['p50']:.2f} ms, "
        f"p95 {client['p95']:.2f} ms, p99 {client['p99']:.2f} ms; QA calls over the language model's 10 ms budget: "
        f"{_rate(chain['qa_over_10ms_rate'])} in the chain, {_rate(baseline['qa_over_10ms_rate'])} alone",
    ]
    return "\n".join(lines)


def chain_cost(chain_reports: Sequence[TurnReport], baseline_reports: Sequence[TurnReport]) -> dict[str, Any]:
    """What the chain adds to the QA call, robust to the engine's own jitter on a busy machine.

    * `beyond_qa_server_ms`: a turn's end-to-end time minus the QA server's own time (the chain's
      stages, hops and hand-offs), against the same for the direct call (its round trip minus the
      server's time): the difference is the chain's cost around the language model.
    * `paired_turn_minus_qa_ms`: per question, the chain's turn minus the direct call's round trip
      (the two measured back to back), summarized.
    """
    chain_beyond = np.asarray([r.total_ns - qa_server_ns(r) for r in chain_reports]) / 1e6
    base_beyond = np.asarray([r.total_ns - qa_server_ns(r) for r in baseline_reports]) / 1e6
    pairs = np.asarray([c.total_ns - b.total_ns for c, b in zip(chain_reports, baseline_reports, strict=True)]) / 1e6
    chain_p50, base_p50 = float(np.percentile(chain_beyond, 50)), float(np.percentile(base_beyond, 50))
    chain_p95, base_p95 = float(np.percentile(chain_beyond, 95)), float(np.percentile(base_beyond, 95))
    return {
        "beyond_qa_server_p50_ms": round(chain_p50 - base_p50, 3),
        "beyond_qa_server_p95_ms": round(chain_p95 - base_p95, 3),
        "paired_turn_minus_qa_ms": percentile_summary(pairs),
    }


async def run(config: PipelineBenchConfig, engine: Path, script: Script) -> dict[str, Any]:
    modes: dict[str, Any] = {}
    for mode in config.modes:
        print(f"[{mode}] the chain, each turn after its baseline ...", file=sys.stderr, flush=True)
        modes[mode] = await measure(config, mode, engine, script)
    return modes


def report(
    config: PipelineBenchConfig, engine: Path, script: Script, modes: dict[str, Any], argv: Sequence[str]
) -> dict[str, Any]:
    from realtime_qa.qacore.engine import EngineMeta

    try:
        meta = EngineMeta.read(engine)
        engine_info = {"dir": str(engine), "backend": meta.backend, "precision": meta.precision, "model": meta.model_id}
    except Exception:  # the figures stand without the description
        engine_info = {"dir": str(engine)}
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()}
    settings["budgets"] = config.budgets.as_ms()
    machine = machine_description()
    torch = sys.modules.get("torch")  # loaded only when a GPU engine ran in this process
    if torch is not None and torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name(0)}"
    return {
        "benchmark": "pipeline",
        "machine": machine,
        "python": platform.python_version(),
        "command": "qa-bench pipeline " + shlex.join(argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": engine_info,
        "config": settings,
        "sessions": len(script),
        "units": "milliseconds",
        "percentiles": "exact over every measured turn (linear interpolation), as the dashboard's /api/latency",
        "baseline": "each question also goes straight to the chain's own QA server (a QAServer, as qa-serve runs it: "
        "the same engine), over gRPC on loopback, right before its chain turn",
        "modes": modes,
    }


def markdown(result: dict[str, Any]) -> str:
    engine = result["engine"]
    load = result["load_avg_1m"]
    lines = [
        "# qa-bench pipeline: the conversational chain against the QA call alone",
        "",
        f"- machine: {result['machine']}",
        f"- command: `{result['command']}`",
        f"- engine: {engine.get('backend', '?')} {engine.get('precision', '')} ({engine['dir']})",
        f"- conversation: {result['sessions']} SQuAD dev paragraphs x {result['config']['questions']} questions, "
        f"{result['config']['rounds']} rounds, one turn at a time (text turns; ASR stub with no simulated latency)",
        f"- baseline: {result['baseline']}",
        f"- machine load (1-minute load average, before / after): {load['before']} / {load['after']}",
        f"- percentiles: {result['percentiles']}; budgets (ms): "
        + ", ".join(f"{name} {value:g}" for name, value in result["config"]["budgets"].items()),
        "",
    ]
    for mode, figures in result["modes"].items():
        lines += [f"## {mode}", "", markdown_table(mode, figures["chain"], figures["baseline"]), ""]
        adds, chain, base = figures["chain_adds"], figures["chain"], figures["baseline"]
        beyond, base_beyond, pairs = (
            chain["beyond_qa_server_ms"],
            base["beyond_qa_server_ms"],
            adds["paired_turn_minus_qa_ms"],
        )
        lines += [
            f"What the chain adds around the language model: a turn spends {beyond['p50']:.2f} ms (p50) / "
            f"{beyond['p95']:.2f} ms (p95) outside the QA server's own time, a direct QA call "
            f"{base_beyond['p50']:.2f} / {base_beyond['p95']:.2f} ms: the chain costs "
            f"{adds['beyond_qa_server_p50_ms']:.2f} ms (p50) / {adds['beyond_qa_server_p95_ms']:.2f} ms (p95) more. "
            f"Turn minus the direct call, question by question: p50 {pairs['p50']:.2f} ms, p95 {pairs['p95']:.2f} ms "
            "(this one carries the engine's jitter between the two calls).",
            "",
        ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PipelineBenchConfig()
    add = parser.add_argument
    add("--squad", type=Path, default=defaults.squad, help="SQuAD dev file (.json or .json.gz)")
    add("--paragraphs", type=int, default=defaults.paragraphs, help="sessions: one SQuAD paragraph each")
    add("--questions", type=int, default=defaults.questions, help="turns per session: the paragraph's questions")
    add("--rounds", type=int, default=defaults.rounds, help="how often the conversation is replayed per mode")
    add("--warmup-turns", type=int, default=defaults.warmup_turns, help="unmeasured turns first, per mode")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--split", action="store_true", help="only the split chain (default: one process, then split)")
    modes.add_argument("--one-process", action="store_true", help="only the one-process chain")
    add("--engine", type=Path, help="engine directory (default: the shipped model's CPU engine)")
    add("--budgets", default="", help="per-stage budgets, e.g. qa=10ms,asr=50ms,turn=150ms")
    add("--json-out", type=Path, default=defaults.json_out, help="where the JSON goes")
    add("--markdown-out", type=Path, default=defaults.markdown_out, help="where the Markdown table goes")


def config_from_args(args: argparse.Namespace) -> PipelineBenchConfig:
    modes = ("split",) if args.split else ("one-process",) if args.one_process else MODES
    return PipelineBenchConfig(
        squad=args.squad,
        paragraphs=args.paragraphs,
        questions=args.questions,
        rounds=args.rounds,
        warmup_turns=args.warmup_turns,
        modes=modes,
        engine=args.engine,
        budgets=parse_budgets(args.budgets),
        json_out=args.json_out,
        markdown_out=args.markdown_out,
    )


def run_from_args(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        config = config_from_args(args)
        script = load_script(config.squad, config.paragraphs, config.questions)
    except (ValueError, OSError) as exc:
        print(f"qa-bench pipeline: {exc}", file=sys.stderr)
        return 2
    if config.engine is not None and not (config.engine / "meta.json").is_file():
        print(f"qa-bench pipeline: not an engine directory (no meta.json): {config.engine}", file=sys.stderr)
        return 2
    if config.engine is None:
        from realtime_qa.qacore.default_engine import resolve_default_engine

        engine = resolve_default_engine()
    else:
        engine = config.engine
    load_before = os.getloadavg()
    modes = asyncio.run(run(config, engine, script))
    result = report(config, engine, script, modes, argv)
    result["load_avg_1m"] = {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}
    text = markdown(result)
    print(text)
    config.json_out.parent.mkdir(parents=True, exist_ok=True)
    config.json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    config.markdown_out.parent.mkdir(parents=True, exist_ok=True)
    config.markdown_out.write_text(text, encoding="utf-8")
    print(f"\nwrote {config.json_out} and {config.markdown_out}", file=sys.stderr)
    return 0
