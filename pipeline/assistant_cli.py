"""`qa-assistant`: ask questions about a passage with a compiled engine (the embedded, serverless path).

Mirrors the interface of NVIDIA's TensorRT BERT `inference.py`: passages from -p/-pf, questions from
-q/-qf or an interactive prompt, or a whole SQuAD file with -sq/-o. With no -e the shipped model's CPU
engine is used (INT8, or fp32 with --precision fp32; built on first use by `qa-build --default` in a
child process). Windows are as long as the engine takes unless -s says otherwise. Every failure is one
line on stderr and a non-zero exit code: 2 for bad usage or input, 3 for an engine that cannot be used.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from realtime_qa.qacore.answerer import AnswerResult, QuestionAnswerer
from realtime_qa.qacore.bundle import featurizer_config_of, open_bundle
from realtime_qa.qacore.cli_args import OneLineParser
from realtime_qa.qacore.decoding import DecoderConfig
from realtime_qa.qacore.default_engine import DEFAULT_PRECISION, PRECISIONS, DefaultEngineSpec, resolve_default_engine
from realtime_qa.qacore.engine import EngineMeta
from realtime_qa.qacore.errors import InvalidInputError, QAError
from realtime_qa.qacore.factory import EngineOptions, max_engine_threads
from realtime_qa.qacore.features import MAX_PASSAGE_CHARS
from realtime_qa.qacore.files import read_utf8

EXIT_BAD_INPUT = 2
EXIT_ENGINE = 3

DEMO_PASSAGE = (
    "TensorRT is a high performance deep learning inference platform that delivers low latency and high "
    "throughput for apps such as recommenders, speech and image/video on NVIDIA GPUs. It includes parsers to "
    "import models, and plugins to support novel ops and layers before applying optimizations for inference. "
    "Today NVIDIA is open-sourcing parsers and plugins in TensorRT so that the deep learning community can "
    "customize and extend these components to take advantage of powerful TensorRT optimizations for your apps."
)
DEMO_QUESTIONS = ("What is TensorRT?", "What is included in TensorRT?")
QUIT_WORDS = frozenset({"exit", "quit"})
SQUAD_BATCH_QUESTIONS = 16  # questions whose windows share engine batches in SQuAD mode

log = logging.getLogger("qa-assistant")


@dataclass(frozen=True)
class AssistantConfig:
    """Everything the CLI was asked to do, validated."""

    engine_dir: Path | None
    passage: str | None
    questions: tuple[str, ...]
    squad_json: Path | None
    prediction_file: Path | None
    vocab_file: Path | None
    windows: dict[str, int]  # window options given; the rest follow the engine's sequence length
    decoder: dict[str, object]  # options given on the command line; the rest are the engine's defaults
    engine: EngineOptions
    json_output: bool
    interactive: bool
    precision: str = DEFAULT_PRECISION  # of the default engine (no -e)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="qa-assistant",
        description="Answer questions about a passage with a BERT QA engine (CPU ONNX Runtime by default).",
    )
    parser.add_argument("-e", "--engine", type=Path, help="engine directory (default: the shipped model on CPU)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help=f"precision of the default engine when no -e is given (default {DEFAULT_PRECISION})",
    )
    parser.add_argument("-p", "--passage", nargs="*", default=[], help="passage text (several are joined)")
    parser.add_argument(
        "-pf",
        "--passage-file",
        type=Path,
        help=f"file with the passage (UTF-8, at most {MAX_PASSAGE_CHARS:,} code points)",
    )
    parser.add_argument("-q", "--question", nargs="*", default=[], help="question(s) to ask")
    parser.add_argument("-qf", "--question-file", type=Path, help="file with one question per line")
    parser.add_argument("-sq", "--squad-json", type=Path, help="answer every question of a SQuAD file")
    parser.add_argument("-o", "--output-prediction-file", type=Path, help="write SQuAD predictions here (with -sq)")
    parser.add_argument("-v", "--vocab-file", type=Path, help="vocab.txt or tokenizer.json (default: the engine's)")
    parser.add_argument(
        "-s", "--sequence-length", type=int, help="window length in tokens (default: the engine's longest)"
    )
    parser.add_argument("--max-query-length", type=int, help="question tokens kept (default 64, less on short engines)")
    parser.add_argument("--doc-stride", type=int, help="tokens between window starts (default 128, less on short ones)")
    parser.add_argument("--max-answer-length", type=int, help="longest answer in tokens (default 30)")
    parser.add_argument("--n-best-size", type=int, help="candidate spans kept (default 20)")
    parser.add_argument(
        "--allow-null", action="store_true", help="SQuAD 2.0: the model may answer that there is no answer"
    )
    parser.add_argument(
        "--null-threshold",
        type=float,
        help="with --allow-null: abstain when null - best > this, in logits (default: the model's calibrated "
        "threshold, else 0)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="engine threads, at most the machine's cores (0: the runtime's default)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line and question")
    parser.add_argument("--demo", action="store_true", help="ask the two example questions about TensorRT")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    return parser


def parse_config(argv: Sequence[str] | None) -> AssistantConfig:
    args = build_parser().parse_args(argv)
    if not isinstance(logging.getLevelName(args.log_level.upper()), int):
        raise InvalidInputError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {args.log_level!r}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not 0 <= args.threads <= max_engine_threads():
        raise InvalidInputError(f"--threads must be in [0, {max_engine_threads()}], got {args.threads}")
    if args.precision is not None and args.engine is not None:
        raise InvalidInputError("--precision chooses the default engine; drop it or -e/--engine")
    if args.output_prediction_file and not args.squad_json:
        raise InvalidInputError("-o/--output-prediction-file needs -sq/--squad-json")
    passage = " ".join(args.passage) if args.passage else None
    if args.passage_file:
        if passage is not None:
            raise InvalidInputError("give the passage with -p or -pf, not both")
        passage = read_utf8(args.passage_file, "passage", max_code_points=MAX_PASSAGE_CHARS)
    questions = list(args.question)
    if args.question_file:
        text = read_utf8(args.question_file, "question", max_code_points=MAX_PASSAGE_CHARS)
        questions += [line.strip() for line in text.splitlines() if line.strip()]
    if args.demo:
        if passage is not None or questions or args.squad_json:
            raise InvalidInputError("--demo takes no passage, questions or SQuAD file")
        passage, questions = DEMO_PASSAGE, list(DEMO_QUESTIONS)
    if args.squad_json and (passage is not None or questions):
        raise InvalidInputError("-sq/--squad-json takes its passages and questions from the file; drop -p/-q")
    if not args.squad_json and passage is None:
        raise InvalidInputError("no passage: give -p TEXT, -pf FILE, -sq SQUAD_JSON or --demo")
    return AssistantConfig(
        engine_dir=args.engine,
        passage=passage,
        questions=tuple(questions),
        squad_json=args.squad_json,
        prediction_file=args.output_prediction_file,
        vocab_file=args.vocab_file,
        windows=window_options(args),
        decoder=decoder_options(args),
        engine=EngineOptions(intra_op_threads=args.threads),
        json_output=args.json,
        interactive=not questions and not args.squad_json,
        precision=args.precision or DEFAULT_PRECISION,
    )


def window_options(args: argparse.Namespace) -> dict[str, int]:
    """The window options given on the command line; the rest follow the engine's sequence length."""
    given = {
        "max_seq_length": args.sequence_length,
        "doc_stride": args.doc_stride,
        "max_query_length": args.max_query_length,
    }
    return {name: value for name, value in given.items() if value is not None}


def decoder_options(args: argparse.Namespace) -> dict[str, object]:
    """The decoder options given on the command line, checked now (the rest come from the engine)."""
    given: dict[str, object] = {
        "n_best_size": args.n_best_size,
        "max_answer_length": args.max_answer_length,
        "allow_null": args.allow_null or None,
        "null_threshold": args.null_threshold,
    }
    options = {name: value for name, value in given.items() if value is not None}
    DecoderConfig(**options)  # type: ignore[arg-type]  # refuses absurd values before any engine is opened
    return options


def open_answerer(config: AssistantConfig) -> QuestionAnswerer:
    engine_dir = config.engine_dir
    if engine_dir is None:
        engine_dir = resolve_default_engine(DefaultEngineSpec(precision=config.precision))
    windows = featurizer_config_of(EngineMeta.read(engine_dir), **config.windows) if config.windows else None
    bundle = open_bundle(engine_dir, config.engine, windows, vocab_file=config.vocab_file)
    try:
        return QuestionAnswerer.from_bundle(bundle, bundle.decoder(**config.decoder))
    except BaseException:
        bundle.close()
        raise


def format_result(result: AnswerResult, as_json: bool) -> str:
    timings = result.timings
    timings_ms = {
        "tokenize": timings.tokenize_ns / 1e6,
        "infer": timings.infer_ns / 1e6,
        "decode": timings.decode_ns / 1e6,
        "total": timings.total_ns / 1e6,
    }
    best = result.prediction.best
    if as_json:
        return json.dumps(
            {
                "question": result.question,
                "answer": result.prediction.text,
                # the confidence in what is returned, the answer or the abstention (qacore.confidence)
                "score": result.prediction.confidence,
                "start": best.start if best else -1,
                "end": best.end if best else -1,
                "abstained": result.prediction.abstained,
                "timings_ms": {stage: round(value, 4) for stage, value in timings_ms.items()},
            },
            ensure_ascii=False,
        )
    answer = f"{best.text!r}  (score {best.score:.3f}, code points {best.start}-{best.end})" if best else "(no answer)"
    stages = " | ".join(f"{stage} {value:.2f} ms" for stage, value in timings_ms.items())
    return f"Question: {result.question}\nAnswer: {answer}\nTimings: {stages}\n"


def prompt_questions(stream: TextIO) -> Iterator[str]:
    """Questions typed at the prompt until exit, quit or end of input."""
    while True:
        print("Question (exit or quit to leave): ", end="", flush=True, file=sys.stderr)
        line = stream.readline()
        if not line:
            return
        question = line.strip()
        if question.lower() in QUIT_WORDS:
            return
        if question:
            yield question


def answer_passage(answerer: QuestionAnswerer, config: AssistantConfig, questions: Iterable[str]) -> int:
    assert config.passage is not None
    passage = answerer.encode_passage(config.passage)  # tokenized once for every question
    failures = 0
    for question in questions:
        try:
            print(format_result(answerer.answer(question, passage), config.json_output), flush=True)
        except InvalidInputError as exc:
            if not config.interactive:
                raise
            failures += 1
            print(f"qa-assistant: {exc}", file=sys.stderr)
    return 0 if not failures else EXIT_BAD_INPUT


def answer_squad(answerer: QuestionAnswerer, config: AssistantConfig) -> int:
    """Answer every question of a SQuAD file (passages tokenized once) with a progress bar.

    Predictions go to -o in the official format, or to stdout as one JSON object without -o.
    """
    from realtime_qa.qacore.squad import read_dataset, write_predictions
    from realtime_qa.qacore.squad_answering import answer_dataset

    assert config.squad_json is not None
    dataset = read_dataset(config.squad_json)
    run = answer_dataset(answerer, dataset, batch_size=SQUAD_BATCH_QUESTIONS)
    if config.prediction_file:
        write_predictions(config.prediction_file, run.predictions)
        print(
            f"wrote {len(run.predictions)} predictions to {config.prediction_file} "
            f"({run.questions_per_second:.1f} questions/s)",
            file=sys.stderr,
        )
    else:
        print(json.dumps(run.predictions, ensure_ascii=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["converse"]:  # talk to the conversational chain (pipeline/converse_cli.py)
        from realtime_qa.pipeline.converse_cli import main as converse_main

        return converse_main(arguments[1:])
    try:
        config = parse_config(argv)
        with open_answerer(config) as answerer:
            if config.squad_json:
                return answer_squad(answerer, config)
            questions: Iterable[str] = config.questions or prompt_questions(sys.stdin)
            return answer_passage(answerer, config, questions)
    except InvalidInputError as exc:
        print(f"qa-assistant: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (QAError, OSError) as exc:  # OSError: e.g. an unwritable engine cache for the default engine
        print(f"qa-assistant: error: {exc}", file=sys.stderr)
        return EXIT_ENGINE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
