"""`qa-bench cpu`: latency of one question on the example passage, CPU engines vs Hugging Face + PyTorch.

Every engine answers the same question on the same passage through the same featurizer and decoder;
only the network runner differs (ONNX Runtime fp32, ONNX Runtime INT8, and, as the baseline measured in
the same run, `transformers`' BertForQuestionAnswering on PyTorch eager fp32). Prints a table of
median and p95 per stage and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.report import IN_PROCESS_STAGES, machine_description, percentile_summary
from qacore.answerer import AnswerResult, QuestionAnswerer
from qacore.decoding import decode
from qacore.engine import EngineOutputs
from qacore.errors import QAError
from qacore.factory import EngineOptions
from qacore.features import EngineInputs
from qacore.latency import LatencyTracker

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


def time_answerer(answerer: QuestionAnswerer, config: CpuBenchConfig) -> tuple[list[dict[str, int]], str]:
    for _ in range(config.warmup):
        answerer.answer(config.question, config.passage)
    rows = []
    result: AnswerResult | None = None
    for _ in range(config.iterations):
        result = answerer.answer(config.question, config.passage)
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
    for iteration in range(config.warmup + config.iterations):
        tracker = LatencyTracker()
        with tracker.stage("tokenize"):
            features = answerer.featurizer.featurize(config.question, config.passage)
            batch = answerer.featurizer.batch(features.windows)
        with tracker.stage("infer"):
            outputs = infer(batch)
        with tracker.stage("decode"):
            prediction = decode(features, outputs.start_logits, outputs.end_logits, answerer.decoder_config)
        if iteration >= config.warmup:
            rows.append(tracker.finish().as_dict())
        text = prediction.text
    return rows, text


def build_cpu_engines(config: CpuBenchConfig, scratch: Path) -> dict[str, Path]:
    from builder.build import BuildConfig, build_engine

    engines = {}
    for name, int8 in (("onnxruntime-fp32", False), ("onnxruntime-int8", True)):
        print(f"building {name} engine ...", file=sys.stderr, flush=True)
        engines[name] = build_engine(
            BuildConfig(
                checkpoint=config.model_dir,
                output=scratch / name,
                batch_sizes=(1,),
                sequence_lengths=(384,),
                int8=int8,
                squad_json=config.squad_json if int8 else None,
                calib_num=config.calib_num if int8 else None,
            )
        )
    return engines


def run(config: CpuBenchConfig, command: str) -> dict[str, object]:
    options = EngineOptions(intra_op_threads=config.threads)
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="qa-bench-cpu-") as scratch:
        engines = build_cpu_engines(config, Path(scratch))
        baseline_answerer = None
        for name, engine_dir in engines.items():
            answerer = QuestionAnswerer.from_engine_dir(engine_dir, engine_options=options)
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
        "python": platform.python_version(),
        "command": command,
        "question": config.question,
        "passage_chars": len(config.passage),
        "iterations": config.iterations,
        "warmup": config.warmup,
        "threads": config.threads,
        "units": "milliseconds",
        "results": results,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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
    from pipeline.assistant_cli import DEMO_PASSAGE, DEMO_QUESTIONS

    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "minilm-l6-squad")
    parser.add_argument("--question", default=DEMO_QUESTIONS[0])
    parser.add_argument("--passage", default=DEMO_PASSAGE)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="engine threads (0: runtime default)")
    parser.add_argument("--squad-json", type=Path, default=DEFAULT_SQUAD, help="INT8 calibration questions")
    parser.add_argument("--calib-num", type=int, default=100)
    parser.add_argument("--json-out", type=Path, default=REPO / "benchmarks" / "results" / "cpu_latency.json")
    parser.add_argument("--skip-transformers", action="store_true", help="leave out the transformers baseline")


def run_from_args(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.iterations < 1 or args.warmup < 0 or args.threads < 0:
        print("qa-bench cpu: error: --iterations must be >= 1, --warmup and --threads >= 0", file=sys.stderr)
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
    )
    try:
        report = run(config, " ".join(["qa-bench", "cpu", *argv]))
    except QAError as exc:
        print(f"qa-bench cpu: error: {exc}", file=sys.stderr)
        return 2
    print_table(report)
    config.json_out.parent.mkdir(parents=True, exist_ok=True)
    config.json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {config.json_out}", file=sys.stderr)
    return 0
