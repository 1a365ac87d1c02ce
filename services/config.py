"""The server's typed configuration, read from command-line flags with environment-variable defaults.

Every flag `--some-flag` can also be set as `QA_SERVE_SOME_FLAG`; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qacore.latency import LANGUAGE_MODEL_BUDGET_NS
from services.batcher import BatcherConfig

ENV_PREFIX = "QA_SERVE_"
DEFAULT_PORT = 50051
MiB = 1024 * 1024
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class EngineSpec:
    """One engine directory to serve, under `model_id` (None: the model id in its meta.json)."""

    engine_dir: Path
    model_id: str | None = None

    @classmethod
    def parse(cls, text: str) -> EngineSpec:
        """`DIR` or `MODEL_ID=DIR`."""
        model_id, sep, path = text.partition("=")
        if sep and model_id and "/" not in model_id:
            return cls(Path(path), model_id)
        return cls(Path(text))


@dataclass(frozen=True)
class ServerConfig:
    """Everything `qa-serve` needs; the defaults serve the shipped model on loopback."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port (logged, and returned by QAServer.start)
    engines: tuple[EngineSpec, ...] = ()  # empty: the shipped model's default CPU engine; the first is the default
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    engine_contexts: int = 1  # engine instances per model, each with its own inference thread
    intra_op_threads: int = 0  # threads per engine call (CPU backends; 0 = one per physical core)
    # Idle engine threads spinning before they sleep take CPU from the event loop and the gRPC threads;
    # off by default (on 2 cores it cost a quarter of the throughput; see benchmarks/results/serve_cpu.md).
    engine_spinning: bool = False
    cpu_threads: int = 1  # threads for tokenizing long passages off the event loop
    inline_tokenize_chars: int = 10_000  # passages up to this long (~3 ms) are tokenized on the event loop
    max_message_bytes: int = 4 * MiB  # larger requests are INVALID_ARGUMENT
    passage_cache_chars: int = 32_000_000  # characters of passage text kept for passage ids
    tls_cert: Path | None = None
    tls_key: Path | None = None
    grace_s: float = 10.0  # on shutdown, in-flight requests get this long to finish
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no metrics endpoint; 0 picks a free port
    budget_ns: int = LANGUAGE_MODEL_BUDGET_NS  # the language-model latency budget per question
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be in [0, 65535], got {self.metrics_port}")
        if self.engine_contexts < 1:
            raise ValueError(f"engine contexts must be >= 1, got {self.engine_contexts}")
        if self.intra_op_threads < 0 or self.cpu_threads < 1:
            raise ValueError("intra-op threads must be >= 0 and cpu threads >= 1")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max message bytes must be >= 1024, got {self.max_message_bytes}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        if self.grace_s < 0:
            raise ValueError(f"grace period must be >= 0 s, got {self.grace_s}")
        if self.budget_ns <= 0:
            raise ValueError("the latency budget must be positive")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qa-serve",
        description="Serve extractive question answering over gRPC (qa.v1.QuestionAnswering). "
        f"Each flag may also be set as an environment variable {ENV_PREFIX}<FLAG_NAME>.",
    )
    defaults = ServerConfig()
    batcher = BatcherConfig()
    add = parser.add_argument
    add("--host", default=defaults.host, help="address to listen on (default: %(default)s, loopback only)")
    add("--port", type=int, default=defaults.port, help="port; 0 picks a free one and logs it (default: %(default)s)")
    add(
        "--engine",
        action="append",
        default=[],
        metavar="[MODEL_ID=]DIR",
        help="engine directory to serve (repeatable; the first is the default model; default: the shipped "
        "model's CPU engine, built on first use)",
    )
    add("--max-batch-size", type=int, default=batcher.max_batch_size, help="windows per engine call; 1 = no batching")
    add("--max-queue-delay-us", type=int, default=batcher.max_queue_delay_us, help="longest wait to fill a batch")
    add(
        "--max-queue-windows",
        type=int,
        default=batcher.max_queue_windows,
        help="queue bound (overflow: RESOURCE_EXHAUSTED)",
    )
    add("--bucket-tokens", type=int, default=batcher.bucket_tokens, help="length bucket width for batching")
    add("--engine-contexts", type=int, default=defaults.engine_contexts, help="engine instances (threads) per model")
    add("--intra-op-threads", type=int, default=defaults.intra_op_threads, help="threads per engine call (0 = auto)")
    add(
        "--engine-spinning",
        action=argparse.BooleanOptionalAction,
        default=defaults.engine_spinning,
        help="let idle engine threads spin before sleeping (faster only on cores nothing else needs; measured "
        "on 2 shared cores: 19.7 answers/s with spinning, 25.5 without)",
    )
    add("--cpu-threads", type=int, default=defaults.cpu_threads, help="threads tokenizing long passages")
    add(
        "--inline-tokenize-chars",
        type=int,
        default=defaults.inline_tokenize_chars,
        help="tokenize shorter passages inline",
    )
    add("--max-message-bytes", type=int, default=defaults.max_message_bytes, help="largest request accepted")
    add("--passage-cache-chars", type=int, default=defaults.passage_cache_chars, help="passage text kept for ids")
    add("--tls-cert", type=Path, default=None, help="PEM certificate chain (with --tls-key: serve TLS)")
    add("--tls-key", type=Path, default=None, help="PEM private key")
    add("--grace-s", type=float, default=defaults.grace_s, help="shutdown grace period for in-flight requests")
    add("--metrics-host", default=defaults.metrics_host, help="address of the Prometheus endpoint")
    add("--metrics-port", type=int, default=None, help="Prometheus /metrics port (0 = a free port; default: off)")
    add("--budget-ms", type=float, default=defaults.budget_ns / 1e6, help="language-model latency budget per question")
    add("--log-level", default=defaults.log_level, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def config_from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Parse flags (after environment defaults); exits with a one-line message on bad values."""
    parser = build_parser()
    environ = os.environ if environ is None else environ
    env_defaults: dict[str, object] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = environ.get(ENV_PREFIX + action.dest.upper())
        if value is None:
            continue
        if action.dest == "engine":
            env_defaults["engine"] = [part for part in value.split(",") if part]
        elif action.nargs == 0:  # a switch: the variable holds its value
            if value.strip().lower() not in TRUE_WORDS | FALSE_WORDS:
                parser.error(f"{ENV_PREFIX}{action.dest.upper()}={value!r} is not a boolean (1/0, true/false)")
            env_defaults[action.dest] = value.strip().lower() in TRUE_WORDS
        elif action.type is not None and callable(action.type):
            try:
                env_defaults[action.dest] = action.type(value)
            except ValueError:
                parser.error(f"{ENV_PREFIX}{action.dest.upper()}={value!r} is not a valid value")
        else:
            env_defaults[action.dest] = value
    parser.set_defaults(**env_defaults)
    args = parser.parse_args(argv)
    try:
        return ServerConfig(
            host=args.host,
            port=args.port,
            engines=tuple(EngineSpec.parse(text) for text in args.engine),
            batcher=BatcherConfig(
                max_batch_size=args.max_batch_size,
                max_queue_delay_us=args.max_queue_delay_us,
                max_queue_windows=args.max_queue_windows,
                bucket_tokens=args.bucket_tokens,
            ),
            engine_contexts=args.engine_contexts,
            intra_op_threads=args.intra_op_threads,
            engine_spinning=args.engine_spinning,
            cpu_threads=args.cpu_threads,
            inline_tokenize_chars=args.inline_tokenize_chars,
            max_message_bytes=args.max_message_bytes,
            passage_cache_chars=args.passage_cache_chars,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            grace_s=args.grace_s,
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port,
            budget_ns=round(args.budget_ms * 1e6),
            log_level=args.log_level,
        )
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
