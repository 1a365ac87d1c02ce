"""The server's typed configuration, declared once: each setting is a dataclass field that carries its flag,
help text, bounds and environment variable, and the command-line parser and the environment mapping are
derived from those declarations.

Every flag `--some-flag` can also be set as `QA_SERVE_SOME_FLAG`; a flag given on the command line wins.

To add a setting, add one field to `ServerConfig` (or `BatcherConfig`) with `setting(...)`:

    auth_token_file: Path | None = setting(None, "file of accepted bearer tokens", parse=Path)

and read it from the config object; the flag `--auth-token-file`, the variable `QA_SERVE_AUTH_TOKEN_FILE`,
the bounds check and the `--help` line follow from the declaration.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from realtime_qa.qacore.cli_args import OneLineParser
from realtime_qa.qacore.default_engine import DEFAULT_PRECISION, PRECISIONS
from realtime_qa.qacore.latency import LANGUAGE_MODEL_BUDGET_NS

ENV_PREFIX = "QA_SERVE_"
DEFAULT_PORT = 50051
MiB = 1024 * 1024
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
SETTING_KEY = "qa_setting"  # dataclass field metadata key holding a `Setting`
NESTED_KEY = "qa_settings_of"  # metadata key of a field whose value is a dataclass of further settings
MAX_THREADS = 64  # cap of every thread-count setting: more threads than this only thrash on any host we serve
MAX_ENGINE_CONTEXTS = 16  # each context holds a copy of the engine's memory
GPU_SYNC_MODES = ("auto", "spin", "block")
EVENT_LOOPS = ("auto", "asyncio", "uvloop")  # auto: uvloop where it is installed (a dependency but on Windows)


@dataclass(frozen=True)
class Setting:
    """How one config field is set from the outside (see `setting`)."""

    help: str
    parse: Callable[[str], Any] = str  # text (a flag's argument or an environment value) -> flag value
    to_field: Callable[[Any], Any] | None = None  # flag value -> field value (e.g. milliseconds -> ns)
    from_field: Callable[[Any], Any] | None = None  # field value -> flag value, for --help
    flag: str | None = None  # default: the field name with dashes
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    minimum: float | None = None  # bounds of the field value, checked by `check_bounds`
    maximum: float | None = None
    switch: bool = False  # a boolean: --flag / --no-flag; the variable holds 1/0, true/false, yes/no, on/off
    repeatable: bool = False  # the flag may repeat; the variable holds a comma-separated list
    optional: bool = False  # None is allowed and means "off" / "not given"


def setting(default: Any, help: str, **options: Any) -> Any:
    """A dataclass field that is also a `qa-serve` flag and a `QA_SERVE_*` environment variable."""
    spec = Setting(help=help, **options)
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults need a factory")
    return field(default=default, metadata={SETTING_KEY: spec})


def check_bounds(config: Any) -> None:
    """Raise ValueError naming the flag when a field is outside its declared bounds."""
    for item in dataclasses.fields(config):
        spec: Setting | None = item.metadata.get(SETTING_KEY)
        value = getattr(config, item.name)
        if spec is None or value is None or spec.switch or spec.repeatable:
            continue
        if (spec.minimum is not None and value < spec.minimum) or (spec.maximum is not None and value > spec.maximum):
            low = "" if spec.minimum is None else f"{_number(spec.minimum)}"
            high = "" if spec.maximum is None else f"{_number(spec.maximum)}"
            bounds = f"in [{low}, {high}]" if low and high else (f">= {low}" if low else f"<= {high}")
            raise ValueError(f"{flag_of(item.name, spec)} ({item.name}) must be {bounds}, got {value}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def flag_of(name: str, spec: Setting) -> str:
    return spec.flag or "--" + name.replace("_", "-")


def env_name_of(name: str, spec: Setting) -> str:
    return ENV_PREFIX + flag_of(name, spec).removeprefix("--").replace("-", "_").upper()


@dataclass(frozen=True)
class EngineAddress:
    """Where a `--workers` process finds the engine process of one engine directory (`--engine-process`;
    set by the supervisor, passed to the workers with their configuration, never a flag)."""

    engine_dir: Path
    socket_path: str
    authkey: bytes

    def __repr__(self) -> str:  # the key never reaches a log line
        return f"EngineAddress({str(self.engine_dir)!r}, {self.socket_path!r})"


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
class BatcherConfig:
    """How windows are grouped into engine calls, and how much of the engine one caller may hold."""

    max_batch_size: int = setting(
        16, "windows per engine call (capped at the engine's own maximum); 1 = no batching", parse=int,
        minimum=1, maximum=4096,
    )  # fmt: skip
    max_queue_delay_us: int = setting(
        1_000, "longest a window waits for others to fill its batch while another batch runs (microseconds; "
        "an idle engine starts at once)", parse=int,
        minimum=0, maximum=1_000_000,
    )  # fmt: skip
    max_queue_windows: int = setting(
        2_048, "queue bound in windows; a request that does not fit gets RESOURCE_EXHAUSTED", parse=int,
        minimum=1, maximum=10_000_000,
    )  # fmt: skip
    bucket_tokens: int = setting(
        64, "windows within the same multiple of this many tokens batch together first", parse=int,
        minimum=1, maximum=100_000,
    )  # fmt: skip
    max_request_windows: int = setting(
        2_048, "most windows one question may need; a longer passage is INVALID_ARGUMENT", parse=int,
        minimum=1, maximum=10_000_000,
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True)
class ServerConfig:
    """Everything `qa-serve` needs; the defaults serve the shipped model on loopback."""

    host: str = setting("127.0.0.1", "address to listen on (loopback only by default)")
    port: int = setting(DEFAULT_PORT, "port; 0 picks a free one and logs it", parse=int, minimum=0, maximum=65535)
    engines: tuple[EngineSpec, ...] = setting(
        (),
        "engine directory to serve (repeatable; the first is the default model; default: the shipped model's "
        "CPU engine, built on first use)",
        flag="--engine", metavar="[MODEL_ID=]DIR", parse=EngineSpec.parse, repeatable=True,
    )  # fmt: skip
    precision: str = setting(
        DEFAULT_PRECISION, "precision of the shipped model's default engine, served when no --engine is given",
        choices=PRECISIONS,
    )  # fmt: skip
    batcher: BatcherConfig = field(default_factory=BatcherConfig, metadata={NESTED_KEY: BatcherConfig})
    span_search: bool = setting(
        True,
        "search answer spans on the device where the engine can (the torch engine; as qa-eval and qa-assistant "
        "do); off: every engine returns logits and the CPU decodes them",
        switch=True,
    )
    engine_contexts: int = setting(
        1, "engine instances (threads) per model; with 2 or more, callers with a backlog leave one free for others; "
        "with --engine-process, the engine process holds this many and runs this many batches at once",
        parse=int, minimum=1, maximum=MAX_ENGINE_CONTEXTS,
    )  # fmt: skip
    intra_op_threads: int = setting(
        0, "threads per engine call (CPU backends; 0 = one per physical core)", parse=int, minimum=0,
        maximum=MAX_THREADS,
    )  # fmt: skip
    # Idle engine threads spin a moment before they sleep, as in qa-assistant and the chain (EngineOptions): waking
    # sleeping threads added 2-5 ms to a call at concurrency 1 on two cores, on an Intel Xeon and an AMD EPYC
    # instance, while answers/s at concurrency 8 and 32, one or two workers, stayed within run-to-run noise
    # (benchmarks/results/serve_cpu_spinning.md). Off (--no-engine-spinning) for cores other work needs.
    engine_spinning: bool = setting(
        True,
        "let idle engine threads spin before sleeping (2-5 ms faster at concurrency 1 on 2 cores, same answers/s "
        "at 8-32; --no-engine-spinning gives their CPU to other work)",
        switch=True,
    )
    cpu_threads: int = setting(
        1, "threads tokenizing long passages off the event loop", parse=int, minimum=1, maximum=MAX_THREADS
    )
    inline_tokenize_chars: int = setting(
        10_000, "passages up to this long (~3 ms) are tokenized on the event loop", parse=int, minimum=0,
        maximum=1_000_000,
    )  # fmt: skip
    max_message_bytes: int = setting(
        4 * MiB, "largest request accepted (INVALID_ARGUMENT above it)", parse=int, minimum=1024, maximum=256 * MiB
    )
    max_stream_questions: int = setting(
        32, "questions one AnswerStream may have in flight (unanswered); the server reads no further until one "
        "is answered", parse=int, minimum=1, maximum=10_000,
    )  # fmt: skip
    passage_cache_chars: int = setting(
        32_000_000, "characters of passage text kept for passage ids", parse=int, minimum=0
    )
    tls_cert: Path | None = setting(  # noqa: RUF009 - a field() with metadata, not a shared default
        None, "PEM certificate chain (with --tls-key: serve TLS)", parse=Path, optional=True
    )
    tls_key: Path | None = setting(None, "PEM private key", parse=Path, optional=True)  # noqa: RUF009
    tls_client_ca: Path | None = setting(  # noqa: RUF009
        None, "PEM CA bundle: clients must present a certificate it signed (mutual TLS; needs --tls-cert)",
        parse=Path, optional=True,
    )  # fmt: skip
    auth_token_file: Path | None = setting(  # noqa: RUF009
        None, "file of accepted bearer tokens, one per line, reloaded on SIGHUP: every RPC but health checks "
        "needs `authorization: Bearer <token>`", parse=Path, optional=True,
    )  # fmt: skip
    passage_store: str = setting(
        "memory", "where passage ids live: memory (this process) or redis://HOST:PORT/DB (shared by replicas)"
    )
    passage_ttl_s: int = setting(
        3600, "seconds a passage lives in the shared store", parse=int, minimum=1, maximum=30 * 24 * 3600
    )
    # uvloop against asyncio on the H200 at concurrency 256 (--workers 8, each pair in one device call):
    # +59 % and +2 % answers/s (benchmarks/results/serve_h200_workers.md); the same latency at concurrency 1.
    # The calls it once left unanswered were a race in the batcher that uvloop's early timers exposed (fixed;
    # tests/test_uvloop_hang.py).
    event_loop: str = setting(
        "auto", "the event loop each server process runs on: uvloop (as fast or faster: +2 % to +59 % answers/s "
        "at concurrency 256 on the GPU host), asyncio, or auto: uvloop where it is installed, else asyncio",
        choices=EVENT_LOOPS,
    )  # fmt: skip
    workers: int = setting(
        1, "server processes sharing the port (SO_REUSEPORT), metrics merged on --metrics-port", parse=int,
        minimum=1, maximum=64,
    )  # fmt: skip
    reuse_port: bool = False  # set by `--workers` for its processes (not a flag)
    engine_process: bool = setting(
        False, "one process per model holds the engine (one GPU context) and the --workers processes send it "
        "their batches, instead of each worker holding its own engine", switch=True,
    )  # fmt: skip
    remote_engines: tuple[EngineAddress, ...] = ()  # set by `--engine-process` for its workers (not a flag)
    gpu_sync: str = setting(
        "auto", "how a GPU engine waits for results: spin (sooner, burns a core while it waits; a process that "
        "holds its engine launches the span search from its event loop and polls it, no thread hop), block (a "
        "thread sleeps until the driver wakes it), auto: block when --workers processes each hold the GPU, "
        "else spin", choices=GPU_SYNC_MODES,
    )  # fmt: skip
    grace_s: float = setting(
        10.0, "shutdown grace period: in-flight calls get this long, and the process exits within about it",
        parse=float, minimum=0, maximum=3600,
    )  # fmt: skip
    metrics_host: str = setting("127.0.0.1", "address of the Prometheus endpoint")
    metrics_port: int | None = setting(
        None, "Prometheus /metrics port (0 = a free port; default: off)", parse=int, minimum=0, maximum=65535,
        optional=True,
    )  # fmt: skip
    budget_ns: int = setting(
        LANGUAGE_MODEL_BUDGET_NS, "language-model latency budget per question (ms)", flag="--budget-ms",
        parse=float, to_field=lambda ms: round(ms * 1e6), from_field=lambda ns: ns / 1e6, minimum=1,
    )  # fmt: skip
    reflection: bool = setting(True, "serve gRPC server reflection (v1 and v1alpha)", switch=True)
    log_level: str = setting("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        check_bounds(self)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("mutual TLS (--tls-client-ca) needs the server's own --tls-cert and --tls-key")
        if self.passage_store != "memory" and not self.passage_store.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--passage-store must be memory or redis://HOST:PORT/DB, got {self.passage_store!r}")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# -- deriving the command line and the environment from the declarations ------------------------------


@dataclass(frozen=True)
class _Declared:
    path: tuple[str, ...]  # field names from ServerConfig down, e.g. ("batcher", "max_batch_size")
    spec: Setting
    default: Any

    @property
    def dest(self) -> str:
        return "__".join(self.path)

    @property
    def flag(self) -> str:
        return flag_of(self.path[-1], self.spec)

    @property
    def env(self) -> str:
        return env_name_of(self.path[-1], self.spec)


def declared_settings(cls: type = ServerConfig, prefix: tuple[str, ...] = ()) -> Iterator[_Declared]:
    """Every setting of `cls` (nested ones included), in declaration order."""
    for item in dataclasses.fields(cls):
        nested = item.metadata.get(NESTED_KEY)
        if nested is not None:
            yield from declared_settings(nested, (*prefix, item.name))
            continue
        spec = item.metadata.get(SETTING_KEY)
        if spec is not None:
            yield _Declared((*prefix, item.name), spec, item.default)


def environment_variables() -> tuple[str, ...]:
    """The `QA_SERVE_*` variables qa-serve reads."""
    return tuple(declared.env for declared in declared_settings())


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="qa-serve",
        description="Serve extractive question answering over gRPC (qa.v1.QuestionAnswering). "
        f"Each flag may also be set as an environment variable {ENV_PREFIX}<FLAG_NAME>.",
    )
    for declared in declared_settings():
        spec = declared.spec
        shown = spec.from_field(declared.default) if spec.from_field and declared.default is not None else None
        shown = declared.default if shown is None else shown
        help_text = f"{spec.help} (default: {shown if shown not in (None, ()) else 'none'}; env {declared.env})"
        help_text = help_text.replace("%", "%%")
        if spec.switch:
            parser.add_argument(
                declared.flag, dest=declared.dest, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=help_text,
            )  # fmt: skip
        else:
            parser.add_argument(
                declared.flag, dest=declared.dest, type=spec.parse, default=argparse.SUPPRESS,
                action="append" if spec.repeatable else "store",
                metavar=spec.metavar or declared.flag.removeprefix("--").replace("-", "_").upper(),
                choices=spec.choices,
                help=help_text,
            )  # fmt: skip
    return parser


def _from_environment(declared: _Declared, text: str) -> Any:
    spec = declared.spec
    if spec.switch:
        word = text.strip().lower()
        if word not in TRUE_WORDS | FALSE_WORDS:
            raise ValueError(f"{declared.env}={text!r} is not a boolean (1/0, true/false)")
        return word in TRUE_WORDS
    try:
        if spec.repeatable:
            return [spec.parse(part) for part in text.split(",") if part]
        value = spec.parse(text)
    except ValueError:
        raise ValueError(f"{declared.env}={text!r} is not a valid value") from None
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"{declared.env}={text!r} is not one of {', '.join(spec.choices)}")
    return value


def config_from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Parse flags (after environment defaults); exits with a one-line message (exit 2) on bad values."""
    parser = build_parser()
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for declared in declared_settings():
        text = environ.get(declared.env)
        if text is not None:
            try:
                values[declared.dest] = _from_environment(declared, text)
            except ValueError as exc:
                parser.error(str(exc))
    values.update(vars(parser.parse_args(argv)))
    try:
        return _build(ServerConfig, (), values)
    except ValueError as exc:
        parser.error(str(exc))


def _build(cls: type, prefix: tuple[str, ...], values: Mapping[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        nested = item.metadata.get(NESTED_KEY)
        if nested is not None:
            kwargs[item.name] = _build(nested, (*prefix, item.name), values)
            continue
        spec: Setting | None = item.metadata.get(SETTING_KEY)
        dest = "__".join((*prefix, item.name))
        if spec is None or dest not in values:
            continue
        value = values[dest]
        if spec.repeatable:
            value = tuple(value)
        elif spec.to_field is not None and value is not None:
            value = spec.to_field(value)
        kwargs[item.name] = value
    return cls(**kwargs)
