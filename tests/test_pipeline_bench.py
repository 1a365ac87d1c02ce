"""`qa-bench pipeline` with tiny sizes: it runs the real chain and its baseline, prints and writes the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from realtime_qa.benchmarks.cli import main

pytestmark = pytest.mark.slow


def test_pipeline_bench_one_process_smoke(
    engine_dir: Path, squad_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    json_out, md_out = tmp_path / "realtime_qa.pipeline.json", tmp_path / "realtime_qa.pipeline.md"
    argv = [
        "--log-level", "WARNING", "pipeline", "--one-process",
        "--squad", str(squad_dir / "dev-v1.1.json.gz"), "--paragraphs", "2", "--questions", "2", "--rounds", "1",
        "--warmup-turns", "1", "--engine", str(engine_dir), "--budgets", "qa=5s,turn=10s",
        "--json-out", str(json_out), "--markdown-out", str(md_out),
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(json_out.read_text())
    figures = result["modes"]["one-process"]
    chain, baseline = figures["chain"], figures["baseline"]
    assert chain["turns"]["total"] == 4 and chain["turns"]["error"] == 0 and chain["errors"] == {}
    assert baseline["turns"]["total"] == 4
    for stage in ("asr", "qa", "qa.infer", "qa.network", "response", "turn"):
        row = chain["stages"][stage]
        assert 0 <= row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"], (stage, row)
    assert chain["stages"]["qa"]["budget_ms"] == 5000.0 and chain["stages"]["qa"]["over_budget_rate"] == 0.0
    assert set(baseline["stages"]) == {"qa", "qa.queue", "qa.tokenize", "qa.infer", "qa.decode", "qa.network"}
    assert 0 <= chain["qa_over_10ms_rate"] <= 1
    # a turn contains its QA call: the turn's p50 is no shorter than the chain's own QA p50
    assert chain["stages"]["turn"]["p50_ms"] >= chain["stages"]["qa"]["p50_ms"]
    adds = figures["chain_adds"]
    assert set(adds) == {"beyond_qa_server_p50_ms", "beyond_qa_server_p95_ms", "paired_turn_minus_qa_ms"}
    assert adds["paired_turn_minus_qa_ms"]["n"] == 4
    # time outside the QA server: the chain's stages, hops and hand-offs; the direct call's network
    assert chain["beyond_qa_server_ms"]["p50"] >= 0 and baseline["beyond_qa_server_ms"]["p50"] >= 0
    assert result["machine"] and result["command"].startswith("qa-bench pipeline")
    text = md_out.read_text()
    assert "## one-process" in text and "baseline p50" in text and "\nqa | 5000 | " in text
    assert "## one-process" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--paragraphs", "0"], "must be >= 1"),
        (["--budgets", "qa=fast"], "not a duration"),
        (["--squad", "/nonexistent/dev.json"], "/nonexistent/dev.json"),
        (["--engine", "/nonexistent"], "not an engine directory"),
    ],
)
def test_pipeline_bench_bad_input_is_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pipeline", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
