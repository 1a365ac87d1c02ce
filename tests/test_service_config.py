"""`qa-serve` configuration: flags, environment variables, defaults and one-line errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from realtime_qa.services.batcher import BatcherConfig
from realtime_qa.services.config import DEFAULT_PORT, EngineSpec, ServerConfig, config_from_args


def test_no_flags_serve_the_default_model_on_loopback() -> None:
    config = config_from_args([], environ={})
    assert config == ServerConfig()
    assert (config.host, config.port, config.engines, config.metrics_port) == ("127.0.0.1", DEFAULT_PORT, (), None)


def test_flags_fill_the_typed_config() -> None:
    config = config_from_args(
        [
            "--port", "0", "--engine", "/e/one", "--engine", "fast=/e/two", "--max-batch-size", "4",
            "--max-queue-delay-us", "250", "--max-queue-windows", "64", "--engine-contexts", "2",
            "--intra-op-threads", "1", "--metrics-port", "0", "--grace-s", "3", "--budget-ms", "12.5",
        ],
        environ={},
    )  # fmt: skip
    assert config.port == 0
    assert config.engines == (EngineSpec(Path("/e/one")), EngineSpec(Path("/e/two"), "fast"))
    assert config.batcher == BatcherConfig(max_batch_size=4, max_queue_delay_us=250, max_queue_windows=64)
    assert (config.engine_contexts, config.intra_op_threads, config.metrics_port) == (2, 1, 0)
    assert (config.grace_s, config.budget_ns) == (3.0, 12_500_000)


def test_environment_variables_are_defaults_that_flags_override() -> None:
    environ = {"QA_SERVE_PORT": "6000", "QA_SERVE_MAX_BATCH_SIZE": "8", "QA_SERVE_ENGINE": "/a,m=/b"}
    config = config_from_args([], environ=environ)
    assert (config.port, config.batcher.max_batch_size) == (6000, 8)
    assert config.engines == (EngineSpec(Path("/a")), EngineSpec(Path("/b"), "m"))
    assert config_from_args(["--port", "7000"], environ=environ).port == 7000
    assert config_from_args([], environ={}).engine_spinning is True  # the default, as --help says
    assert config_from_args([], environ={"QA_SERVE_ENGINE_SPINNING": "off"}).engine_spinning is False
    assert config_from_args([], environ={"QA_SERVE_ENGINE_SPINNING": "1"}).engine_spinning is True
    assert config_from_args(["--engine-spinning"], environ={}).engine_spinning is True
    assert (
        config_from_args(["--no-engine-spinning"], environ={"QA_SERVE_ENGINE_SPINNING": "1"}).engine_spinning is False
    )


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--port", "70000"], {}, "--port (port) must be in [0, 65535], got 70000"),
        (["--max-batch-size", "0"], {}, "--max-batch-size (max_batch_size) must be in [1, 4096]"),
        (["--tls-cert", "/c.pem"], {}, "TLS needs both a certificate and a key"),
        (["--engine-contexts", "0"], {}, "--engine-contexts (engine_contexts) must be in [1, 16]"),
        (["--cpu-threads", "1000"], {}, "--cpu-threads (cpu_threads) must be in [1, 64]"),
        (["--intra-op-threads", "500"], {}, "--intra-op-threads (intra_op_threads) must be in [0, 64]"),
        (["--max-request-windows", "0"], {}, "--max-request-windows"),
        ([], {"QA_SERVE_PORT": "abc"}, "QA_SERVE_PORT='abc' is not a valid value"),
        ([], {"QA_SERVE_ENGINE_SPINNING": "maybe"}, "is not a boolean"),
        (["--port", "x"], {}, "invalid int value"),
        (["--port", "abc"], {}, "argument --port: invalid int value: 'abc'"),
    ],
)
def test_bad_values_exit_with_one_line(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        config_from_args(argv, environ=environ)
    assert exited.value.code == 2
    # One line, not the whole usage (the README promises one line per bad flag).
    error_lines = capsys.readouterr().err.splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("qa-serve: error:")
    assert message in error_lines[0]


def test_every_setting_is_declared_once_and_reaches_flag_and_environment() -> None:
    """The parser and the environment mapping are derived from the dataclass declarations: every
    declared field has a flag and a variable, and setting either one changes that field."""
    from realtime_qa.services.config import build_parser, declared_settings

    help_text = build_parser().format_help()
    for declared in declared_settings():
        assert declared.flag in help_text and declared.env in help_text
    assert len({declared.env for declared in declared_settings()}) == len(list(declared_settings()))
    config = config_from_args([], environ={"QA_SERVE_MAX_STREAM_QUESTIONS": "5", "QA_SERVE_REFLECTION": "off"})
    assert (config.max_stream_questions, config.reflection) == (5, False)
    assert config_from_args(["--max-request-windows", "7"], environ={}).batcher.max_request_windows == 7
    assert config_from_args(["--no-reflection"], environ={}).reflection is False


def test_gpu_sync_auto_blocks_only_where_workers_each_hold_the_gpu() -> None:
    from realtime_qa.services.workers import worker_config

    assert config_from_args([]).gpu_sync == "auto"
    assert worker_config(config_from_args(["--workers", "8"]), 1).gpu_sync == "block"  # 8 contexts on one GPU
    assert worker_config(config_from_args(["--workers", "8", "--engine-process"]), 1).gpu_sync == "spin"
    assert worker_config(config_from_args(["--workers", "8", "--gpu-sync", "spin"]), 1).gpu_sync == "spin"
    assert worker_config(config_from_args(["--workers", "1", "--gpu-sync", "block"]), 1).gpu_sync == "block"
    with pytest.raises(SystemExit):
        config_from_args(["--gpu-sync", "sometimes"])
