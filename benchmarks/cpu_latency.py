"""`qa-bench cpu`: latency of one question on the example passage, CPU engines vs Hugging Face + PyTorch.

Every engine answers the same question about the same passage the way `qa-assistant -p ... -q ...` does
(engine opened by `pipeline.assistant_cli.open_answerer`, passage tokenized once, then question
tokenization, engine, decoding): the default engine (ONNX Runtime INT8 from the calibration shipped
with the model), the previous default (ONNX Runtime fp32), and, as the baseline measured in the same
run, `transformers`' BertForQuestionAnswering on PyTorch eager fp32 behind the same featurizer and
decoder. Both ONNX Runtime engines are built exactly as `qa-build --default [--precision fp32]` builds
them; `--engine LABEL=DIR` times more engine directories in the same run (a previous default, say).
Prints a table of median and p95 per stage and writes JSON and a short Markdown table (with the
machine and its load average, since a shared machine inflates every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from realtime_qa.benchmarks.report import IN_PROCESS_STAGES, machine_description, percentile_summary
from realtime_qa.qacore.answerer import AnswerResult, QuestionAnswerer
from realtime_qa.qacore.decoding import decode
from realtime_qa.qacore.engine import META_FILE, EngineOutputs
from realtime_qa.qacore.errors import QAError
from realtime_qa.qacore.features import EngineInputs
from realtime_qa.qacore.latency import LatencyTracker

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SQUAD = REPO.parent / "shared" / "data" / "squad" / "dev-v1.1.json.gz"
STAGES = (*IN_PROCESS_STAGES, "total")


@dataclass(frozen=True)
class CpuBenchConfig:
    model_dir: Path
    question: str
    passage: str
    iterations: int
    warmup: int
    threads: int
    squad_json: Path
    calib_num: int
    json_out: Path
    skip_transformers: bool
    extra_engines: tuple[tuple[str, Path], ...] = ()  # (label, engine directory), timed after the defaults


def time_answerer(answerer: QuestionAnswerer, config: CpuBenchConfig) -> tuple[list[dict[str, int]], str]:
    passage = answerer.encode_passage(config.passage)  # as qa-assistant does: once for all questions
    for _ in range(config.warmup):
        answerer.answer(config.question, passage)
    rows = []
    result: AnswerResult | None = None
    for _ in range(config.iterations):
        result = answerer.answer(config.question, passage)
        rows.append(result.timings.as_dict())
    assert result is not None
    return rows, result.prediction.text


def time_transformers(answerer: QuestionAnswerer, config: CpuBenchConfig) -> tuple[list[dict[str, int]], str]:
    """The same featurize/decode around `transformers`' model on PyTorch (eager, fp32, CPU)."""
    import torch
    from transformers import BertForQuestionAnswering

    if config.threads:
        torch.set_num_threads(config.threads)
    model = BertForQuestionAnswering.from_pretrained(str(config.model_dir), dtype=torch.float32).eval()

    def infer(batch: EngineInputs) -> EngineOutputs:
        with torch.inference_mode():
            out = model(
                input_ids=torch.from_numpy(batch.input_ids).long(),
                token_type_ids=torch.from_numpy(batch.segment_ids).long(),
                attention_mask=torch.from_numpy(batch.input_mask).long(),
            )
        return EngineOutputs(out.start_logits.numpy(), out.end_logits.numpy())

    return time_pipeline(answerer, infer, config)


def time_pipeline(
    answerer: QuestionAnswerer, infer: Callable[[EngineInputs], EngineOutputs], config: CpuBenchConfig
) -> tuple[list[dict[str, int]], str]:
    rows = []
    text = ""
    passage = answerer.encode_passage(config.passage)
    for iteration in range(config.warmup + config.iterations):
        tracker = LatencyTracker()
        with tracker.stage("tokenize"):
            features = answerer.featurizer.featurize(config.question, passage)
            batch = answerer.featurizer.batch(features.windows)
        with tracker.stage("infer"):
            outputs = infer(batch)
        with tracker.stage("decode"):
            prediction = decode(features, outputs.start_logits, outputs.end_logits, answerer.decoder_config)
        if iteration >= config.warmup:
            rows.append(tracker.finish().as_dict())
        text = prediction.text
    return rows, text


# name in the report -> precision of `qa-build --default`
ENGINES = {"onnxruntime-int8 (default)": "int8", "onnxruntime-fp32 (previous default)": "fp32"}


def build_cpu_engines(config: CpuBenchConfig, scratch: Path) -> dict[str, Path]:
    """The default engines of `config.model_dir`, built as `qa-build --default --precision P` builds them."""
    from realtime_qa.builder.build import build_engine
    from realtime_qa.builder.defaults import default_build_config
    from realtime_qa.qacore.default_engine import DefaultEngineSpec

    engines = {}
    for name, precision in ENGINES.items():
        print(f"building {name} engine ...", file=sys.stderr, flush=True)
        spec = DefaultEngineSpec(precision=precision, model_dir=config.model_dir, cache_root=scratch)
        engines[name] = build_engine(default_build_config(spec, scratch / precision))
    return engines


def open_as_assistant(engine_dir: Path, config: CpuBenchConfig) -> QuestionAnswerer:
    """The answerer `qa-assistant -e DIR -p PASSAGE -q QUESTION --threads N` opens."""
    from realtime_qa.pipeline.assistant_cli import open_answerer, parse_config

    argv = ["-e", str(engine_dir), "-p", config.passage, "-q", config.question, "--threads", str(config.threads)]
    return open_answerer(parse_config(argv))


def run(config: CpuBenchConfig, command: str) -> dict[str, object]:
    results: dict[str, dict[str, object]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="qa-bench-cpu-") as scratch:
        engines = {**build_cpu_engines(config, Path(scratch)), **dict(config.extra_engines)}
        baseline_answerer = None
        for name, engine_dir in engines.items():
            answerer = open_as_assistant(engine_dir, config)
            rows, text = time_answerer(answerer, config)
            results[name] = {"answer": text, **summarise(rows)}
            if baseline_answerer is None:
                baseline_answerer = answerer
            else:
                answerer.close()
        assert baseline_answerer is not None
        if not config.skip_transformers:
            rows, text = time_transformers(baseline_answerer, config)
            results["transformers-pytorch-fp32 (baseline)"] = {"answer": text, **summarise(rows)}
        baseline_answerer.close()
    return {
        "benchmark": "cpu_latency",
        "machine": machine_description(),
        "load_average_1_5_15": [round(value, 2) for value in load_before],
        "python": platform.python_version(),
        "command": command,
        "path": "qa-assistant (open_answerer; passage tokenized once, then question tokenize + infer + decode)",
        "question": config.question,
        "passage_chars": len(config.passage),
        "iterations": config.iterations,
        "warmup": config.warmup,
        "threads": config.threads,
        "units": "milliseconds",
        "results": results,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def markdown(report: dict[str, object]) -> str:
    """A short table of the report, with the machine, its load and the command."""
    results = report["results"]
    assert isinstance(results, dict)
    lines = [
        "# CPU latency: one question on the example passage (`qa-bench cpu`)",
        "",
        f"Machine: {report['machine']}; load average (1/5/15 min) at the start: {report['load_average_1_5_15']}"
        " (a shared machine inflates every figure). "
        f"Threads: {report['threads'] or 'runtime default'}. Command: `{report['command']}`. "
        f"Path: {report['path']}. {report['iterations']} iterations after {report['warmup']} warm-up; "
        f"{report['created']}.",
        "",
        "| engine | total p50 (ms) | total p95 (ms) | infer p50 (ms) | tokenize p50 (ms) | decode p50 (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in results.items():
        lines.append(
            f"| {name} | {row['total']['p50']:.2f} | {row['total']['p95']:.2f} | {row['infer']['p50']:.2f} "
            f"| {row['tokenize']['p50']:.3f} | {row['decode']['p50']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def summarise(rows: list[dict[str, int]]) -> dict[str, dict[str, float]]:
    return {stage: percentile_summary(np.array([row[f"{stage}_ns"] for row in rows]) / 1e6) for stage in STAGES}


def print_table(report: dict[str, object]) -> None:
    results = report["results"]
    assert isinstance(results, dict)
    header = f"{'engine':40s}" + "".join(f"{stage + ' p50':>13s}{stage + ' p95':>13s}" for stage in STAGES)
    print(header)
    for name, row in results.items():
        cells = "".join(f"{row[stage]['p50']:13.3f}{row[stage]['p95']:13.3f}" for stage in STAGES)
        print(f"{name:40s}{cells}")
    print(f"(ms; {report['iterations']} iterations after {report['warmup']} warm-up; {report['machine']})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from realtime_qa.pipeline.assistant_cli import DEMO_PASSAGE, DEMO_QUESTIONS

    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "minilm-l6-squad")
    parser.add_argument("--question", default=DEMO_QUESTIONS[0])
    parser.add_argument("--passage", default=DEMO_PASSAGE)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="engine threads (0: runtime default)")
    parser.add_argument(
        "--squad-json", type=Path, default=DEFAULT_SQUAD, help="(unused: INT8 uses the shipped calibration)"
    )
    parser.add_argument("--calib-num", type=int, default=100, help="(unused: INT8 uses the shipped calibration)")
    parser.add_argument("--json-out", type=Path, default=REPO / "benchmarks" / "results" / "cpu_latency.json")
    parser.add_argument("--skip-transformers", action="store_true", help="leave out the transformers baseline")
    parser.add_argument(
        "--engine",
        dest="extra_engines",
        metavar="LABEL=DIR",
        action="append",
        default=[],
        help="also time this engine directory under LABEL (repeatable), e.g. the previous default engine",
    )


def parse_extra_engine(text: str) -> tuple[str, Path]:
    """`LABEL=DIR` of `--engine`; the directory must hold an engine (its meta.json)."""
    label, sep, directory = text.partition("=")
    if not sep or not label.strip() or not directory:
        raise ValueError(f"--engine expects LABEL=DIR, got {text!r}")
    if not (Path(directory) / META_FILE).is_file():
        raise ValueError(f"--engine {label}: no engine ({META_FILE}) in {directory}")
    return label.strip(), Path(directory)


def run_from_args(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.iterations < 1 or args.warmup < 0 or args.threads < 0:
        print("qa-bench cpu: error: --iterations must be >= 1, --warmup and --threads >= 0", file=sys.stderr)
        return 2
    try:
        extra_engines = tuple(parse_extra_engine(text) for text in args.extra_engines)
    except ValueError as exc:
        print(f"qa-bench cpu: error: {exc}", file=sys.stderr)
        return 2
    config = CpuBenchConfig(
        model_dir=args.model_dir,
        question=args.question,
        passage=args.passage,
        iterations=args.iterations,
        warmup=args.warmup,
        threads=args.threads,
        squad_json=args.squad_json,
        calib_num=args.calib_num,
        json_out=args.json_out,
        skip_transformers=args.skip_transformers,
        extra_engines=extra_engines,
    )
    try:
        report = run(config, " ".join(["qa-bench", "cpu", *argv]))
    except QAError as exc:
        print(f"qa-bench cpu: error: {exc}", file=sys.stderr)
        return 2
    print_table(report)
    config.json_out.parent.mkdir(parents=True, exist_ok=True)
    config.json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    config.json_out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(f"wrote {config.json_out} and {config.json_out.with_suffix('.md')}", file=sys.stderr)
    return 0
