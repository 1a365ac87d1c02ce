"""`qa-bench`: one entry point, one subcommand per benchmark.

To add a benchmark, register it in SUBCOMMANDS: its module must define
`add_arguments(parser: argparse.ArgumentParser) -> None` and
`run_from_args(args: argparse.Namespace, argv: Sequence[str]) -> int`. Modules are imported only when
their subcommand runs, so a CPU host never imports what a GPU benchmark needs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from realtime_qa.qacore.cli_args import OneLineParser

# subcommand -> (module, one-line description)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": (
        "realtime_qa.benchmarks.serve_bench",
        "load-test the gRPC service: closed/open loop, unary/stream, batching on/off",
    ),
    "cpu": (
        "realtime_qa.benchmarks.cpu_latency",
        "one question on the example passage: CPU engines vs transformers + PyTorch",
    ),
    "engine": (
        "realtime_qa.benchmarks.engine_bench",
        "engine latency and throughput per batch size and sequence length (GPU)",
    ),
    "pipeline": (
        "realtime_qa.benchmarks.pipeline_bench",
        "the conversational chain per stage, one process and split, vs QA alone",
    ),
    "scale": (
        "realtime_qa.benchmarks.scale_bench",
        "answers/s through nginx for 1-3 replicas and qa-serve --workers 1, 2",
    ),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="qa-bench", description="Benchmarks of the question-answering stack.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    chosen = next((arg for arg in argv if arg in SUBCOMMANDS), None)
    for name, (module_name, description) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=description, description=description)
        if name == chosen:  # only the chosen benchmark's module is imported
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    sub_argv = argv[argv.index(args.command) + 1 :]
    code: int = module.run_from_args(args, sub_argv)
    return code


if __name__ == "__main__":
    sys.exit(main())
