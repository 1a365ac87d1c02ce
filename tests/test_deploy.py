"""The deployment files say what the service understands: compose.yaml and the Dockerfile are checked
against the real `qa-serve` configuration parser (no Docker engine runs here, so they are not started)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.config import ENV_PREFIX, config_from_args, environment_variables

REPO = Path(__file__).resolve().parents[1]


def dockerfile_env() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    env_lines = [line.removeprefix("ENV ") for line in text.splitlines() if line.startswith("ENV ")]
    return dict(re.findall(r"(\w+)=(\S+)", " ".join(env_lines)))


def compose_service() -> dict[str, object]:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    service: dict[str, object] = compose["services"]["qa"]
    return service


def test_compose_and_dockerfile_settings_are_all_understood_by_qa_serve() -> None:
    service = compose_service()
    environment = {**dockerfile_env(), **service["environment"]}  # type: ignore[dict-item]
    serve_settings = {key: value for key, value in environment.items() if key.startswith(ENV_PREFIX)}
    assert serve_settings, "the deployment configures qa-serve through QA_SERVE_* variables"
    config = config_from_args([], environ=serve_settings)
    assert config.host == "0.0.0.0" and config.port == 50051
    assert config.metrics_port == 9100 and config.batcher.max_batch_size == 1 and config.grace_s == 10
    # Every variable is a real flag: an unknown one would be silently ignored, so refuse it here.
    flags = set(environment_variables())
    assert set(serve_settings) <= flags, set(serve_settings) - flags


def test_compose_publishes_the_ports_the_service_listens_on_and_probes_health() -> None:
    service = compose_service()
    assert {str(port).split(":")[-1] for port in service["ports"]} == {"50051", "9100"}  # type: ignore[attr-defined]
    probe = " ".join(service["healthcheck"]["test"])  # type: ignore[index]
    assert "grpc_health" in probe and "qa.v1.QuestionAnswering" in probe and "127.0.0.1:50051" in probe
    assert service["stop_grace_period"] == "15s"  # longer than QA_SERVE_GRACE_S, so SIGTERM drains first
