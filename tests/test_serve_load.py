"""How the load generator spreads questions over its connections (benchmarks/device/serve_load.py `--pick`)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from realtime_qa.benchmarks.device.serve_load import picker
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.server import QAServer


def test_round_robin_takes_each_connection_in_turn_whatever_is_in_flight() -> None:
    in_flight = {"a": 5, "b": 0, "c": 0}
    pick = picker(list(in_flight), in_flight.__getitem__, "round-robin")
    assert [pick() for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_busy_takes_the_connection_with_fewest_in_flight() -> None:
    in_flight = {"a": 3, "b": 1, "c": 2}
    pick = picker(list(in_flight), in_flight.__getitem__, "least-busy")
    chosen = []
    for _ in range(4):  # each question stays in flight
        chosen.append(pick())
        in_flight[chosen[-1]] += 1
    # b (the only 1); b (ties with c at 2, and it is b's turn); c (the only 2); a (all at 3, a's turn)
    assert chosen == ["b", "b", "c", "a"]
    assert in_flight == {"a": 4, "b": 3, "c": 3}


@pytest.mark.parametrize("turns", [3, 7])
def test_least_busy_breaks_ties_in_turn(turns: int) -> None:
    pick = picker(["a", "b", "c"], lambda _: 0, "least-busy")
    assert [pick() for _ in range(turns)] == ["a", "b", "c", "a", "b", "c", "a"][:turns]


@pytest.mark.parametrize("api", ["unary", "stream"])
async def test_the_load_generator_answers_over_least_busy_connections(
    api: str, engine_dir: Path, squad_dir: Path, tmp_path: Path
) -> None:
    """A real server and one load process with two connections: every question answered, in both APIs."""
    out = tmp_path / "load.json"
    async with QAServer(ServerConfig(port=0, engines=(EngineSpec(engine_dir),))) as server:
        load = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "realtime_qa.benchmarks.device.serve_load", "--target", server.target,
            "--squad", str(squad_dir / "dev-v1.1.json.gz"), "--questions", "20", "--concurrency", "2",
            "--processes", "1", "--channels", "2", "--duration-s", "1", "--warmup-s", "0.5", "--api", api,
            "--pick", "least-busy", "--event-loop", "asyncio", "--out", str(out),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            output, _ = await asyncio.wait_for(load.communicate(), 120)
        finally:
            if load.returncode is None:
                load.kill()
                await load.wait()
    assert load.returncode == 0, output.decode()[-2000:]
    row = json.loads(out.read_text())
    assert row["pick"] == "least-busy" and row["api"] == api
    assert set(row["codes"]) == {"OK"} and row["codes"]["OK"] > 0
