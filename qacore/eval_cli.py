"""`qa-eval`: the SQuAD evaluator, scoring a predictions file or running an engine over a SQuAD dev set.

Scoring mode, a drop-in for the official scripts (same numbers, same JSON on stdout):

    qa-eval DATASET_FILE PREDICTIONS_FILE [--na-prob-file F] [--na-prob-thresh T] [--out-file F]

Engine mode: answer the first N questions in file order with an engine (the default engine when
`--engine` is not given), print a progress bar and a summary table on stderr and the metric JSON on stdout:

    qa-eval [--engine DIR] --squad-json dev-v1.1.json.gz [--limit N] [--output-prediction-file F]

The metric version comes from the dataset's "version" field unless `--version` says otherwise. Bad
input gives a one-line error on stderr and exit status 2; an engine that cannot be used (missing,
corrupt, faulty) one line and exit status 3.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from realtime_qa.qacore.cli_args import OneLineParser
from realtime_qa.qacore.default_engine import DEFAULT_PRECISION, PRECISIONS
from realtime_qa.qacore.errors import EngineError, InvalidInputError, QAError
from realtime_qa.qacore.factory import max_engine_threads
from realtime_qa.qacore.squad import (
    ARTICLE_HALVES,
    METRIC_VERSIONS,
    SquadDataset,
    read_dataset,
    read_na_probs,
    read_predictions,
    write_na_probs,
    write_predictions,
)
from realtime_qa.qacore.squad_metric import DEFAULT_NA_PROB_THRESH, SquadScores, evaluate

if TYPE_CHECKING:
    from realtime_qa.qacore.squad_answering import EngineRun

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
EXIT_ENGINE = 3
MISSING_LISTED = 10  # missing-prediction warnings printed one by one before a count of the rest


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="qa-eval",
        description="Score SQuAD v1.1/v2.0 predictions exactly as the official scripts do, or run an engine "
        "over a SQuAD dataset and score it.",
    )
    parser.add_argument("dataset_file", nargs="?", type=Path, help="SQuAD dataset (.json or .json.gz) to score against")
    parser.add_argument("predictions_file", nargs="?", type=Path, help="predictions JSON {question id: answer}")
    parser.add_argument(
        "--version", choices=METRIC_VERSIONS, help="metric version (default: the dataset's 'version' field)"
    )
    parser.add_argument("--na-prob-file", type=Path, help="v2.0: JSON {question id: no-answer probability}")
    parser.add_argument(
        "--na-prob-thresh",
        type=_finite_float,
        default=DEFAULT_NA_PROB_THRESH,
        help="v2.0: predict no answer when the no-answer probability exceeds this (default: %(default)s)",
    )
    parser.add_argument("--out-file", type=Path, help="also write the metric JSON to this file")
    parser.add_argument(
        "--article-half",
        choices=ARTICLE_HALVES,
        help="score (and in engine mode answer) only the first or the second half of the dataset's articles",
    )
    engine = parser.add_argument_group("engine mode")
    engine.add_argument("--engine", type=Path, help="engine directory (default: the default engine, built if needed)")
    engine.add_argument(
        "--precision",
        choices=PRECISIONS,
        help=f"precision of the default engine when no --engine is given (default {DEFAULT_PRECISION})",
    )
    engine.add_argument(
        "--squad-json", type=Path, help="SQuAD dataset to answer with the engine (turns on engine mode)"
    )
    engine.add_argument("--limit", type=_count(0), help="answer only the first N questions in file order")
    engine.add_argument("--output-prediction-file", type=Path, help="write the predictions JSON here")
    engine.add_argument(
        "--output-na-prob-file",
        type=Path,
        help="v2.0: write the no-answer probabilities here (default: beside --output-prediction-file)",
    )
    engine.add_argument(
        "--batch-size", type=_count(1), default=1, help="questions answered per engine call group (default: 1)"
    )
    engine.add_argument(
        "--threads",
        type=_count(0),
        default=0,
        help="CPU engine threads, at most the machine's cores (default: 0 = one per physical core)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="qa-eval: %(levelname)s: %(message)s")
    engine_mode = args.engine is not None or args.squad_json is not None
    try:
        if engine_mode:
            _check_engine_args(parser, args)
            scores = run_engine_mode(args)
        else:
            _check_scoring_args(parser, args)
            scores = run_scoring_mode(args)
    except InvalidInputError as exc:
        print(f"qa-eval: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except QAError as exc:  # the engine cannot be used (missing, corrupt, mismatched, faulty)
        print(f"qa-eval: error: {exc}", file=sys.stderr)
        return EXIT_ENGINE
    print(scores.to_json())
    return 0


def _check_scoring_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.dataset_file is None or args.predictions_file is None:
        parser.error("give DATASET_FILE and PREDICTIONS_FILE, or --squad-json for engine mode")
    engine_only = {
        "--limit": args.limit is not None,
        "--output-prediction-file": args.output_prediction_file is not None,
        "--output-na-prob-file": args.output_na_prob_file is not None,
        "--batch-size": args.batch_size != 1,
        "--threads": args.threads != 0,
        "--precision": args.precision is not None,
    }
    used = [flag for flag, given in engine_only.items() if given]
    if used:
        parser.error(f"{', '.join(used)} apply to engine mode only (--squad-json)")


def _check_engine_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.squad_json is None:
        parser.error("engine mode needs --squad-json DATASET")
    if args.dataset_file is not None or args.predictions_file is not None:
        parser.error("engine mode (--engine/--squad-json) takes no DATASET_FILE/PREDICTIONS_FILE arguments")
    if args.na_prob_file is not None:
        parser.error("--na-prob-file applies to scoring mode; engine mode computes its own no-answer probabilities")
    if args.precision is not None and args.engine is not None:
        parser.error("--precision chooses the default engine; drop it or --engine")
    if args.threads > max_engine_threads():
        parser.error(f"--threads must be in [0, {max_engine_threads()}], got {args.threads}")


def resolve_version(dataset: SquadDataset, requested: str | None) -> str:
    """The metric version to use: `requested`, else the one the dataset's version field names."""
    if requested is not None:
        return requested
    own = dataset.metric_version
    if own is None:
        raise InvalidInputError(
            f"cannot tell the SQuAD version of {dataset.source} from its version field {dataset.version!r}; "
            "pass --version 1.1 or --version 2.0"
        )
    return own


def _warn_version_override(dataset: SquadDataset, version: str) -> None:
    # After scoring, so that a failed run prints its error line alone.
    if dataset.metric_version != version:
        print(
            f"qa-eval: warning: scored as v{version}, but {dataset.source} says version {dataset.version!r}",
            file=sys.stderr,
        )


def run_scoring_mode(args: argparse.Namespace) -> SquadScores:
    dataset = read_dataset(args.dataset_file)
    if args.article_half is not None:
        dataset = dataset.article_half(args.article_half)
    version = resolve_version(dataset, args.version)
    predictions = read_predictions(args.predictions_file)
    na_probs = read_na_probs(args.na_prob_file) if args.na_prob_file is not None else None
    scores = evaluate(dataset, predictions, version, na_probs, args.na_prob_thresh)
    _warn_version_override(dataset, version)
    _warn_missing(scores)
    _write_out_file(args.out_file, scores)
    return scores


def run_engine_mode(args: argparse.Namespace) -> SquadScores:
    dataset = read_dataset(args.squad_json)
    if args.article_half is not None:
        dataset = dataset.article_half(args.article_half)
    version = resolve_version(dataset, args.version)
    if args.limit is not None:
        dataset = dataset.head(args.limit)
    if version == "1.1" and args.output_na_prob_file is not None:
        raise InvalidInputError(
            "--output-na-prob-file applies to SQuAD 2.0 data only (v1.1 has no unanswerable questions)"
        )
    if dataset.num_questions == 0:
        raise InvalidInputError(
            f"no questions to answer in {args.squad_json}" + (" (--limit 0)" if args.limit == 0 else "")
        )
    # Heavy imports (engine runtimes) only here, so scoring mode stays light.
    from realtime_qa.qacore.answerer import QuestionAnswerer
    from realtime_qa.qacore.bundle import open_bundle
    from realtime_qa.qacore.factory import EngineOptions
    from realtime_qa.qacore.squad_answering import answer_dataset

    engine_dir = args.engine if args.engine is not None else _default_engine_dir(args.precision)
    with open_bundle(engine_dir, EngineOptions(intra_op_threads=args.threads)) as bundle:
        answerer = QuestionAnswerer.from_bundle(bundle, bundle.decoder(allow_null=version == "2.0"))
        run = answer_dataset(answerer, dataset, args.batch_size)
    na_probs = run.na_probs if version == "2.0" else None
    if args.output_prediction_file is not None:
        write_predictions(args.output_prediction_file, run.predictions)
    na_prob_file = args.output_na_prob_file or _beside(args.output_prediction_file, "_na_probs.json")
    if na_probs is not None and na_prob_file is not None:
        write_na_probs(na_prob_file, na_probs)
    scores = evaluate(dataset, run.predictions, version, na_probs, args.na_prob_thresh)
    _warn_version_override(dataset, version)
    print(summary_table(scores, run), file=sys.stderr)
    _write_out_file(args.out_file, scores)
    return scores


def _default_engine_dir(precision: str | None) -> Path:
    """The default engine (built in a child `qa-build --default` process on first use)."""
    from realtime_qa.qacore.default_engine import DefaultEngineSpec, resolve_default_engine

    try:
        return resolve_default_engine(DefaultEngineSpec(precision=precision or DEFAULT_PRECISION))
    except OSError as exc:  # e.g. an unwritable engine cache
        raise EngineError(f"cannot use the default engine: {exc}") from None


def _beside(path: Path | None, suffix: str) -> Path | None:
    if path is None:
        return None
    stem = path.name.removesuffix(".gz").removesuffix(".json")
    return path.with_name(stem + suffix)


def summary_table(scores: SquadScores, run: EngineRun) -> str:
    """EM, F1, throughput and per-question latency percentiles, one row each."""
    exact_key, f1_key = ("exact_match", "f1") if scores.version == "1.1" else ("exact", "f1")
    latencies_ms = np.asarray(run.latencies_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(latencies_ms, [50, 90, 99]) if latencies_ms.size else (math.nan,) * 3
    rows = [
        ("questions", f"{len(run.predictions)}"),
        ("EM", f"{scores[exact_key]:.2f}"),
        ("F1", f"{scores[f1_key]:.2f}"),
        ("questions/s", f"{run.questions_per_second:.1f}"),
        ("latency p50 (ms)", f"{p50:.2f}"),
        ("latency p90 (ms)", f"{p90:.2f}"),
        ("latency p99 (ms)", f"{p99:.2f}"),
    ]
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    lines = [f"{name:<{width}}  {value:>{value_width}}" for name, value in rows]
    rule = "-" * (width + 2 + value_width)
    return "\n".join([rule, *lines, rule])


def _warn_missing(scores: SquadScores) -> None:
    missing = scores.missing_predictions
    for qid in missing[:MISSING_LISTED]:
        print(f"qa-eval: warning: no prediction for question {qid}; it scores 0", file=sys.stderr)
    if len(missing) > MISSING_LISTED:
        print(
            f"qa-eval: warning: ... and {len(missing) - MISSING_LISTED} more questions without a prediction",
            file=sys.stderr,
        )


def _write_out_file(path: Path | None, scores: SquadScores) -> None:
    if path is None:
        return
    try:
        path.write_text(scores.to_json() + "\n", encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"cannot write {path}: {exc.strerror or exc}") from None


if __name__ == "__main__":
    sys.exit(main())
