"""The deployment files say what the service understands. No Docker engine runs here, so images are not built
and containers are not started: compose.yaml is validated by Debian's `docker-compose config` for both
profiles, its settings and the Dockerfiles' are checked against the real `qa-serve` configuration
parser, and the nginx configuration is checked by `nginx -t`. The process-level tests (test_scaleout,
test_monitoring, test_security) run the same programs for real."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from deploy_support import load_nginx_renderer
from realtime_qa.services.config import ENV_PREFIX, config_from_args, environment_variables

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
PROFILES = ("cpu", "gpu")


def dockerfile(name: str = "Dockerfile") -> str:
    return (REPO / name).read_text(encoding="utf-8").replace("\\\n", " ")


def dockerfile_env(name: str = "Dockerfile") -> dict[str, str]:
    env_lines = [line.removeprefix("ENV ") for line in dockerfile(name).splitlines() if line.startswith("ENV ")]
    return dict(re.findall(r"(\w+)=(\S+)", " ".join(env_lines)))


def compose_config(profile: str) -> dict[str, Any]:
    """`docker-compose --profile P config` with .env.example: the file as compose itself reads it."""
    if shutil.which("docker-compose") is None:
        pytest.skip("needs Debian's docker-compose")
    done = subprocess.run(
        ["docker-compose", "--env-file", str(REPO / ".env.example"), "--profile", profile, "config"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


@pytest.fixture(scope="module")
def composed() -> dict[str, dict[str, Any]]:
    return {profile: compose_config(profile) for profile in PROFILES}


def test_both_profiles_validate_and_wire_the_stack(composed: dict[str, dict[str, Any]]) -> None:
    for profile, replica, balancer, front in (
        ("cpu", "qa", "nginx", "assistant"),
        ("gpu", "qa-gpu", "nginx-gpu", "assistant-gpu"),
    ):
        services = composed[profile]["services"]
        assert {"redis", "prometheus", "grafana", replica, balancer, front} <= set(services)
        assert profile in services[replica]["profiles"] and profile in services[balancer]["profiles"]
        healthy = {"condition": "service_healthy"}
        assert services[balancer]["depends_on"] == {replica: healthy, front: healthy}
        assert services[replica]["depends_on"] == {"redis": {"condition": "service_healthy"}}
        assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
        assert "ports" not in services[replica]  # replicas scale: only nginx publishes a port
        assert services[replica]["environment"]["QA_SERVE_PASSAGE_STORE"] == "redis://redis:6379/0"
    gpu = composed["gpu"]["services"]["qa-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "qa" in gpu["networks"]["default"]["aliases"]  # nginx and Prometheus find either kind as `qa`
    redis_command = " ".join(composed["cpu"]["services"]["redis"]["command"])
    assert "--maxmemory-policy allkeys-lru" in redis_command and "--maxmemory 256mb" in redis_command


def test_compose_and_dockerfile_settings_are_all_understood_by_qa_serve(
    composed: dict[str, dict[str, Any]],
) -> None:
    known = set(environment_variables())
    for profile, replica, image in (("cpu", "qa", "Dockerfile"), ("gpu", "qa-gpu", "Dockerfile.gpu")):
        environment = {**dockerfile_env(image), **composed[profile]["services"][replica]["environment"]}
        serve_settings = {key: str(value) for key, value in environment.items() if key.startswith(ENV_PREFIX)}
        # Every variable is a real flag: an unknown one would be silently ignored, so refuse it here.
        assert set(serve_settings) <= known, set(serve_settings) - known
        config = config_from_args([], environ=serve_settings)
        assert config.host == "0.0.0.0" and config.port == 50051 and config.metrics_port == 9100
        assert config.grace_s == 10 and config.passage_store == "redis://redis:6379/0" and config.workers == 1
        assert config.batcher.max_batch_size == (1 if profile == "cpu" else 32)
        assert str(config.engines[0].engine_dir).startswith("/app/engines/")


def test_images_build_their_engine_run_unprivileged_and_probe_grpc_health() -> None:
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = dockerfile(name)
        engine = dockerfile_env(name)["QA_SERVE_ENGINE"]
        assert re.search(rf"RUN .*qa-build .*--output {re.escape(engine)}\b", text), name  # at image build time
        assert re.search(r"^USER (?!root|0\b)\S+", text, flags=re.MULTILINE), name
        healthcheck = next(line for line in text.splitlines() if line.startswith("HEALTHCHECK"))
        assert "grpc_health" in healthcheck and "qa.v1.QuestionAnswering" in healthcheck, name
    gpu = dockerfile("Dockerfile.gpu")
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", gpu, flags=re.MULTILINE)
    assert base and re.fullmatch(r"nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3", base.group(1))  # pinned release
    assert re.search(r"carries TensorRT \d+\.\d+", gpu)  # says which TensorRT the pinned image carries
    assert "ARG ENGINE_BACKEND=torch" in gpu  # PyTorch CUDA engine by default


def test_the_assistant_front_asks_every_replica_and_is_balanced_probed_and_scraped(
    composed: dict[str, dict[str, Any]],
) -> None:
    from realtime_qa.pipeline.pipeline_cli import config_from_args as pipeline_config

    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "assistant"]
    (discovery,) = job["dns_sd_configs"]
    for profile, front, replica in (("cpu", "assistant", "qa"), ("gpu", "assistant-gpu", "qa-gpu")):
        services = composed[profile]["services"]
        service = services[front]
        assert profile in service["profiles"]
        assert service["depends_on"] == {replica: {"condition": "service_healthy"}}
        command = service["command"]
        assert command[0] == "qa-pipeline"
        config, _ = pipeline_config(command[1:])  # the real qa-pipeline parser understands every flag
        assert config.qa_target == "dns:///qa:50051" and config.host == "0.0.0.0"  # round_robin over replicas
        assert (config.assistant_port, config.dashboard_port) == (50061, 8080)
        assert config.budgets.of("qa") == 10_000_000
        probe = " ".join(service["healthcheck"]["test"])
        assert "assistant.v1.Assistant" in probe and "127.0.0.1:50061" in probe
        (dashboard,) = service["ports"]  # "HOST_IP:PORT:TARGET" (compose v1) or a mapping (compose v2)
        if isinstance(dashboard, str):
            host_ip, _, target = dashboard.split(":")
            dashboard = {"host_ip": host_ip, "target": int(target.removesuffix("/tcp"))}
        assert dashboard["target"] == 8080 and dashboard["host_ip"] == "127.0.0.1"
        # nginx fronts assistant.v1 with the repo's template; Prometheus scrapes the front's /metrics
        balancer = services["nginx" if profile == "cpu" else "nginx-gpu"]
        assert balancer["environment"]["ASSISTANT_UPSTREAM"] == "assistant:50061"
        assert any("assistant-grpc.conf.template" in str(volume) for volume in balancer["volumes"])
        assert discovery["names"] == ["assistant"] and discovery["port"] == dashboard["target"]
        if profile == "gpu":
            assert "assistant" in service["networks"]["default"]["aliases"]


def test_compose_probes_health_and_drains_before_it_kills(composed: dict[str, dict[str, Any]]) -> None:
    service = composed["cpu"]["services"]["qa"]
    probe = " ".join(service["healthcheck"]["test"])
    assert "grpc_health" in probe and "qa.v1.QuestionAnswering" in probe and "127.0.0.1:50051" in probe
    assert service["stop_grace_period"] == "15s"  # longer than QA_SERVE_GRACE_S, so SIGTERM drains first


def test_every_compose_variable_is_documented_in_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", (REPO / "compose.yaml").read_text(encoding="utf-8")))
    documented = set(re.findall(r"^([A-Z0-9_]+)=", (REPO / ".env.example").read_text(encoding="utf-8"), re.M))
    assert used <= documented, used - documented
    docs = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    assert all(name in docs for name in used), [name for name in used if name not in docs]


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs Debian's nginx")
def test_the_nginx_configuration_passes_nginx_t_with_and_without_tls(tmp_path: Path) -> None:
    render = load_nginx_renderer()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    layouts = [
        render.NginxLayout(prefix=tmp_path / "plain", qa_upstreams=("127.0.0.1:50051", "127.0.0.1:50052")),
        render.NginxLayout(
            prefix=tmp_path / "tls", qa_upstreams=("127.0.0.1:50051",), assistant_listen="127.0.0.1:8081",
            assistant_upstreams=("127.0.0.1:50061",), tls_cert=cert, tls_key=key, qa_tls_listen="127.0.0.1:8443",
        ),
    ]  # fmt: skip
    for layout in layouts:
        render.render(layout)
        command = [c for c in render.nginx_command(layout) if c not in ("-g", "daemon off;")]
        done = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    qa = (tmp_path / "plain" / "conf.d" / "qa-grpc.conf").read_text(encoding="utf-8")
    assert qa.count("server 127.0.0.1:5005") == 2 and "max_fails=" in qa and "least_conn;" in qa
    assert "grpc_pass grpc://qa_replicas;" in qa and "http2" in qa
    retry_lines = [line for line in qa.splitlines() if line.strip().startswith("grpc_next_upstream ")]
    assert retry_lines and all("non_idempotent" not in line for line in retry_lines)  # sent calls are never resent
    assert "ssl_certificate" in (tmp_path / "tls" / "conf.d" / "qa-tls.inc").read_text(encoding="utf-8")
    assert "grpc://assistant_replicas" in (tmp_path / "tls" / "conf.d" / "assistant-grpc.conf").read_text()
