"""`qa-bench serve` options for side-by-side servers: --variant, --passages, --api, --echo-event-loops (errors are one
line), and rows for both passage forms and both APIs from one run against a real in-process server."""

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
        (["--api", "unary,rest"], "--api must list unary and/or stream"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert qa_bench(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


async def test_both_apis_and_passage_forms_at_every_point(engine_dir: Path, squad_dir: Path) -> None:
    async with QAServer(ServerConfig(port=0, engines=(EngineSpec(engine_dir),))) as server:
        config = ServeBenchConfig(
            target=server.target, squad=squad_dir / "dev-v1.1.json.gz", questions=10, concurrency=(1, 2),
            passage_forms=("inline", "ids"), apis=("unary", "stream"), duration_s=0.5, warmup_s=0.1,
        )  # fmt: skip
        rows = await run(config)
    assert [(row["api"], row["passages"], row["concurrency"]) for row in rows] == [
        (api, passages, level) for api in ("unary", "stream") for passages in ("inline", "ids") for level in (1, 2)
    ]
    for row in rows:
        assert row["server"] == "external" and row["answered"] > 0 and row["codes"] == {"OK": row["answered"]}
        assert row["client_loop"] in ("asyncio", "uvloop")
    table = markdown_table(rows)
    assert "| external | 2 | ids | unary |" in table and "| external | 2 | inline | stream |" in table


async def test_echo_floor_over_unary_calls_and_streams() -> None:
    from realtime_qa.benchmarks.grpc_echo import markdown_table as echo_table
    from realtime_qa.benchmarks.grpc_echo import measure

    rows = await measure((1, 3), duration_s=0.3, warmup_s=0.1, apis=("unary", "stream"))
    assert [(row["api"], row["concurrency"]) for row in rows] == [
        ("unary", 1),
        ("unary", 3),
        ("stream", 1),
        ("stream", 3),
    ]
    for row in rows:
        assert row["errors"] == 0 and row["answered"] > 0 and row["client_ms"]["p50"] > 0
    client_loop = rows[0]["client_loop"]  # the test's own loop
    assert f"| asyncio | {client_loop} | stream | 3 |" in echo_table(rows)
