"""`qa-build`: turn a BERT QA checkpoint into an engine directory (options follow NVIDIA's BERT builder.py).

    qa-build -m models/minilm-l6-squad -o engines/minilm-cpu                      # ONNX Runtime fp32
    qa-build -m ckpt/ -o engines/minilm-int8 --int8 --squad-json dev-v1.1.json.gz --calib-path calib.json
    qa-build -m ckpt/ -o engines/minilm-trt --backend tensorrt --fp16 -b 1 -b 8 -s 128 -s 384
    qa-build --default                                    # the cached default engine (INT8, shipped calibration)
    qa-build --default --precision fp32                   # the cached default fp32 engine

Exit status: 0 built, 2 bad options (one line on stderr), 1 the checkpoint or the build failed (one line).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from realtime_qa.builder.build_config import (
    BACKENDS,
    DEFAULT_BATCH_SIZES,
    DEFAULT_CALIB_NUM,
    DEFAULT_SEQUENCE_LENGTHS,
    BuildConfig,
)
from realtime_qa.qacore.cli_args import OneLineParser
from realtime_qa.qacore.default_engine import DEFAULT_PRECISION, PRECISIONS, DefaultEngineSpec
from realtime_qa.qacore.errors import InvalidInputError, QAError

PROG = "qa-build"
EXIT_FAILED = 1
EXIT_USAGE = 2


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Build a BERT question-answering engine from a checkpoint.")
    p.add_argument(
        "-m", "--checkpoint", type=Path, help="HF model dir, .safetensors/.bin file, TF checkpoint, or .onnx"
    )
    p.add_argument("-o", "--output", type=Path, help="engine directory to create")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help="runtime the engine is for")
    p.add_argument(
        "-b",
        "--batch-size",
        type=positive_int,
        action="append",
        dest="batch_sizes",
        metavar="N",
        help=f"batch size to optimise for; repeat for several; the largest is the engine's max "
        f"(default {' '.join(map(str, DEFAULT_BATCH_SIZES))})",
    )
    p.add_argument(
        "-s",
        "--sequence-length",
        type=positive_int,
        action="append",
        dest="sequence_lengths",
        metavar="N",
        help=f"sequence length to optimise for; repeatable; the largest is the engine's max "
        f"(default {' '.join(map(str, DEFAULT_SEQUENCE_LENGTHS))})",
    )
    p.add_argument("-c", "--config-dir", type=Path, help="directory holding config.json / bert_config.json")
    p.add_argument("-v", "--vocab-file", type=Path, help="vocab.txt or tokenizer.json, if not beside the weights")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and compute (tensorrt, torch)")
    p.add_argument("--int8", action="store_true", help="INT8 calibrated on SQuAD questions (onnxruntime, tensorrt)")
    p.add_argument("--squad-json", type=Path, help="SQuAD file (.json or .json.gz) with calibration questions")
    p.add_argument(
        "--calib-num", type=positive_int, metavar="N", help=f"questions to calibrate on (default {DEFAULT_CALIB_NUM})"
    )
    p.add_argument("--calib-path", type=Path, help="calibration cache: reused when it matches, else written")
    p.add_argument("-w", "--workspace-size", type=positive_int, metavar="MIB", help="TensorRT builder workspace in MiB")
    p.add_argument("-tcf", "--timing-cache-file", type=Path, help="TensorRT timing cache (read and updated)")
    p.add_argument(
        "--init-qa-head-seed",
        type=int,
        metavar="SEED",
        help="give a base encoder (no QA head) a random head from this seed",
    )
    p.add_argument("--default", action="store_true", help="build (or find) the cached default CPU engine")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULT_PRECISION,
        help="with --default: int8 (calibration shipped with the model) or fp32 (default %(default)s)",
    )
    p.add_argument(
        "--default-model-dir", type=Path, help="with --default: another model directory than the shipped one"
    )
    p.add_argument(
        "--cache-root", type=Path, help="with --default: engine cache (default $QA_ENGINE_CACHE or ~/.cache)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing output directory / cached engine")
    p.add_argument("--verbose", action="store_true", help="log build steps")
    return p


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    if args.checkpoint is None or args.output is None:
        raise InvalidInputError("-m/--checkpoint and -o/--output are required (or --default)")
    return BuildConfig(
        checkpoint=args.checkpoint,
        output=args.output,
        backend=args.backend,
        batch_sizes=tuple(args.batch_sizes or DEFAULT_BATCH_SIZES),
        sequence_lengths=tuple(args.sequence_lengths or DEFAULT_SEQUENCE_LENGTHS),
        config_dir=args.config_dir,
        vocab_file=args.vocab_file,
        fp16=args.fp16,
        int8=args.int8,
        squad_json=args.squad_json,
        calib_num=args.calib_num,
        calib_path=args.calib_path,
        workspace_size_mib=args.workspace_size,
        timing_cache_file=args.timing_cache_file,
        init_qa_head_seed=args.init_qa_head_seed,
        force=args.force,
    )


DEFAULT_ONLY = ("--precision", "--default-model-dir", "--cache-root")


def build_default(args: argparse.Namespace, argv: Sequence[str]) -> Path:
    from realtime_qa.builder.defaults import ensure_default_engine

    allowed = {"--default", "--force", "--verbose", *DEFAULT_ONLY}
    others = [arg for arg in argv if arg.startswith("-") and arg.split("=")[0] not in allowed]
    if others:
        raise InvalidInputError(f"--default builds the shipped model's CPU engine and takes no {others[0]}")
    spec = DefaultEngineSpec(precision=args.precision, model_dir=args.default_model_dir, cache_root=args.cache_root)
    return ensure_default_engine(spec, force=args.force)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    started = time.perf_counter_ns()
    try:
        if args.default:
            engine_dir = build_default(args, argv)
        else:
            given = [option for option in DEFAULT_ONLY if any(arg.split("=")[0] == option for arg in argv)]
            if given:
                raise InvalidInputError(f"{given[0]} applies with --default only (use --int8 for an INT8 build)")
            from realtime_qa.builder.build import build_engine

            engine_dir = build_engine(config_from_args(args))
    except InvalidInputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except QAError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    from realtime_qa.qacore.engine import EngineMeta

    meta = EngineMeta.read(engine_dir)
    seconds = (time.perf_counter_ns() - started) / 1e9
    print(f"{engine_dir}  ({meta.backend} {meta.precision}, {meta.model_id}, {seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
