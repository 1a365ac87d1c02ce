"""Monitoring with real programs: Debian's prometheus runs the repo's scrape jobs (deploy/prometheus/) against
two `qa-serve` replicas and the per-stage latency series are read back through its HTTP API; the Grafana
dashboard (deploy/grafana/) is checked against the metric names a live replica exports, and its queries
are run by that same Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import REPO, Process, free_port, port_open, scrape, spawn, start_replica, wait_for, wait_serving
from realtime_qa.pipeline.client import ClientConfig, QAClient, Question, RetryPolicy
from realtime_qa.qacore.latency import STAGES

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus")

SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "latency-budget.json"
PASSAGE = "The Normans gave their name to Normandy, a region in France. Their leader was Rollo."
METRIC_NAME = re.compile(r"\b(qa_[a-z0-9_]+)\b")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def exported_names(metrics_text: str) -> set[str]:
    """Every series name the endpoint exports, including families declared but without samples yet."""
    names = {line.split("{")[0].split(" ")[0] for line in metrics_text.splitlines() if line and line[0] != "#"}
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", metrics_text, flags=re.MULTILINE):
        names.add(family)
        if kind == "histogram":
            names.update(f"{family}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
    return names


def test_the_dashboard_covers_the_latency_budget_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    for needed in ("p50 / p95 / p99", "10 ms budget", "over-budget", "batch size", "queue depth"):
        assert needed in titles, needed
    queries = " ".join(dashboard_queries())
    assert all(f"histogram_quantile({q}" in queries for q in ("0.5", "0.95", "0.99"))
    # Stages come from the live label values, never from a copied stage list.
    stage_variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "stage")
    assert "label_values(qa_stage_latency_seconds_count, stage)" in stage_variable["query"]["query"]
    assert all(stage not in queries for stage in ('"tokenize"', '"infer"', '"decode"', '"queue"'))


def the_repo_scrape_jobs_for(targets: list[str], directory: Path) -> Path:
    """The repo's Prometheus file with its DNS discovery (compose) swapped for these replicas' addresses."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "qa" in jobs and jobs["qa"]["dns_sd_configs"][0]["names"] == ["qa"]
    qa_job = jobs["qa"]
    del qa_job["dns_sd_configs"]
    qa_job["static_configs"] = [{"targets": targets}]
    config["scrape_configs"] = [qa_job]
    config["global"]["scrape_interval"] = "1s"  # the test reads series back within seconds
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def prometheus_query(port: int, query: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def prometheus_ready(port: int) -> bool:
    if not port_open(port):
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:  # 503 while the storage starts
        return False


@pytest.fixture
def replicas(engine_dir: Path, tmp_path: Path) -> Iterator[list[Process]]:
    started = []
    try:
        for index in range(2):
            started.append(
                start_replica(f"qa-{index}", tmp_path / f"qa-{index}", engine_dir, "--intra-op-threads", "1")
            )
        wait_serving(started)
        yield started
    finally:
        for process in started:
            process.stop(timeout_s=20)


@pytest.mark.slow
async def test_prometheus_scrapes_every_replica_and_serves_the_stage_latencies(
    replicas: list[Process], tmp_path: Path
) -> None:
    for replica in replicas:
        async with QAClient(f"127.0.0.1:{replica.port}", ClientConfig(retry=RetryPolicy(max_attempts=1))) as client:
            for index in range(3):
                assert (await client.answer(Question(f"Who was their leader ({index})?", PASSAGE))).text
    targets = [f"127.0.0.1:{replica.metrics_port}" for replica in replicas]
    config = the_repo_scrape_jobs_for(targets, tmp_path)
    port = free_port()
    prometheus = spawn(
        "prometheus",
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        tmp_path,
    )  # fmt: skip
    try:
        wait_for(lambda: prometheus_ready(port), 60, "prometheus ready", 0.2)

        def every_replica_has_stage_series() -> list[dict[str, Any]] | None:
            reply = prometheus_query(port, 'qa_stage_latency_seconds_count{job="qa", stage="end_to_end"} > 0')
            series: list[dict[str, Any]] = reply["data"]["result"]
            return series if {s["metric"]["instance"] for s in series} == set(targets) else None

        series = wait_for(every_replica_has_stage_series, 60, "both replicas' series in prometheus", 0.5)
        assert all(float(s["value"][1]) >= 3 for s in series)
        for stage in STAGES:  # every server stage reaches Prometheus, per replica
            reply = prometheus_query(port, f'sum by (instance) (qa_stage_latency_seconds_count{{stage="{stage}"}})')
            assert len(reply["data"]["result"]) == len(targets), stage
        # Every dashboard query is valid PromQL for this Prometheus and names only exported metrics.
        live = exported_names(scrape(replicas[0].metrics_port or 0))
        for query in dashboard_queries():
            names = set(METRIC_NAME.findall(query))
            assert names, query
            assert names <= live, (query, names - live)
            if query.startswith("label_values("):
                continue  # a Grafana function, not PromQL
            promql = query.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$stage", "infer")
            assert prometheus_query(port, promql)["status"] == "success", promql
        quantile = prometheus_query(
            port,
            'histogram_quantile(0.5, sum by (le) (rate(qa_stage_latency_seconds_bucket{stage="end_to_end"}[1m])))',
        )
        assert quantile["status"] == "success"
    finally:
        prometheus.stop(timeout_s=20)
