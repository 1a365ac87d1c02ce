"""`qa-bench serve` against a real in-process server: closed and open loop, unary and stream, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from realtime_qa.benchmarks.cli import main as qa_bench
from realtime_qa.benchmarks.serve_bench import ServeBenchConfig, markdown_table, run
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.server import QAServer


async def test_closed_loop_over_unary_calls(engine_dir: Path, squad_dir: Path) -> None:
    async with QAServer(ServerConfig(port=0, engines=(EngineSpec(engine_dir),))) as server:
        config = ServeBenchConfig(
            target=server.target, squad=squad_dir / "dev-v1.1.json.gz", questions=20,
            concurrency=(1, 4), duration_s=0.5, warmup_s=0.1,
        )  # fmt: skip
        rows = await run(config)
    assert [row["concurrency"] for row in rows] == [1, 4]
    for row in rows:
        assert row["answered"] > 0 and row["codes"] == {"OK": row["answered"]}
        assert row["throughput_rps"] == pytest.approx(row["answered"] / config.duration_s)
        assert 0 < row["client_ms"]["p50"] <= row["client_ms"]["p99"]
        assert row["server_ms"]["infer"]["p50"] > 0
        assert row["server_ms"]["total"]["p50"] <= row["client_ms"]["p99"]
    table = markdown_table(rows)
    assert table.count("\n") == 3 and "| external | 4 |" in table


async def test_open_loop_over_streams(engine_dir: Path, squad_dir: Path) -> None:
    async with QAServer(ServerConfig(port=0, engines=(EngineSpec(engine_dir),))) as server:
        config = ServeBenchConfig(
            target=server.target, squad=squad_dir / "dev-v1.1.json.gz", questions=20, mode="open",
            rates=(10.0,), arrivals="constant", apis=("stream",), streams=2, duration_s=1.0, warmup_s=0.2,
        )  # fmt: skip
        rows = await run(config)
    assert len(rows) == 1 and rows[0]["rate_rps"] == 10.0 and rows[0]["api"] == "stream"
    assert 3 <= rows[0]["answered"] <= 12  # about ten arrivals in one second at a constant rate


def test_bad_options_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert qa_bench(["serve", "--compare-batching", "--target", "127.0.0.1:1"]) == 2
    assert "cannot be used with --target" in capsys.readouterr().err
    assert qa_bench(["serve", "--squad", str(tmp_path / "missing.json")]) == 2
    assert "SQuAD file not found" in capsys.readouterr().err


def test_json_out_from_the_command_line(engine_dir: Path, squad_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    code = qa_bench(
        ["serve", "--engine", str(engine_dir), "--squad", str(squad_dir / "dev-v1.1.json.gz"), "--questions", "10",
         "--concurrency", "2", "--duration-s", "0.5", "--warmup-s", "0.1", "--json-out", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("qa-bench serve --engine")
    assert report["results"][0]["batching"] == "on" and report["results"][0]["answered"] > 0
    assert report["cpu_offload"]["question_tokenize_inline_us"] > 0
