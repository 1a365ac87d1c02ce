"""`qa-bench serve` options for side-by-side servers: --variant, --passages, --echo-event-loops (errors are one line),
and rows for both passage forms from one run against a real in-process server."""

from __future__ import annotations

from pathlib import Path

import pytest
from realtime_qa.benchmarks.cli import main as qa_bench
from realtime_qa.benchmarks.serve_bench import ServeBenchConfig, markdown_table, run
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.server import QAServer


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variant", "a=", "--target", "127.0.0.1:1"], "cannot be used with --target"),
        (["--variant", "a=", "--variant", "a=--event-loop uvloop"], "labels must differ"),
        (["--variant", "no-equals-sign"], "must be LABEL=FLAGS"),
        (["--passages", "inline,files"], "--passages must list inline and/or ids"),
        (["--echo-event-loops", "trio"], "--echo-event-loops must list asyncio and/or uvloop"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert qa_bench(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


async def test_both_passage_forms_at_every_point(engine_dir: Path, squad_dir: Path) -> None:
    async with QAServer(ServerConfig(port=0, engines=(EngineSpec(engine_dir),))) as server:
        config = ServeBenchConfig(
            target=server.target, squad=squad_dir / "dev-v1.1.json.gz", questions=10, concurrency=(1, 2),
            passage_forms=("inline", "ids"), duration_s=0.5, warmup_s=0.1,
        )  # fmt: skip
        rows = await run(config)
    assert [(row["passages"], row["concurrency"]) for row in rows] == [
        ("inline", 1),
        ("inline", 2),
        ("ids", 1),
        ("ids", 2),
    ]
    for row in rows:
        assert row["server"] == "external" and row["answered"] > 0 and row["codes"] == {"OK": row["answered"]}
    assert "| external | 2 | ids |" in markdown_table(rows)
