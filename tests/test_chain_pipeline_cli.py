"""`qa-pipeline`: one command starts the chain; SIGTERM stops it, the --split stage processes included."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from realtime_qa.pipeline.converse_cli import main as converse_main

READY_TIMEOUT_S = 300.0


def children_of(pid: int) -> set[int]:
    """Live child processes of `pid` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def pipeline_command(*args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import sys; from realtime_qa.pipeline.pipeline_cli import main; sys.exit(main())",
        *args,
    ]


@pytest.mark.slow
def test_split_pipeline_serves_a_conversation_and_stops_on_sigterm(
    engine_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = pipeline_command(
        "--split", "--engine", str(engine_dir), "--port", "0", "--dashboard-port", "0", "--log-level", "WARNING"
    )
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        assert process.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + READY_TIMEOUT_S
        # readline() blocks: a child that hangs without a word is killed at the deadline, which ends the read.
        watchdog = threading.Timer(READY_TIMEOUT_S, process.kill)
        watchdog.start()
        try:
            while not any("ready" in line for line in lines):
                assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
                lines.append(process.stderr.readline())
        finally:
            watchdog.cancel()
        text = "".join(lines)
        target = re.search(r"assistant\.v1 on (\S+);", text)
        assert target is not None and re.search(r"dashboard: http://127\.0\.0\.1:\d+/", text)
        stages = children_of(process.pid)
        assert len(stages) == 3  # ASR stub, response, QA

        passage = tmp_path / "passage.txt"
        passage.write_text("Rollo led the Norse raiders who settled in Normandy.")
        turns = tmp_path / "turns.txt"
        turns.write_text("Who led the Norse raiders?\n")
        code = converse_main(
            ["--target", target.group(1), "-pf", str(passage), "--turns-file", str(turns), "--budgets", "qa=5s"]
        )
        assert code == 0
        assert "Answer:    'Rollo'" in capsys.readouterr().out

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        for pid in stages:  # reparented orphans would still be alive: every stage process must be gone
            assert not _alive(pid), f"stage process {pid} outlived qa-pipeline"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--engine", "/nonexistent-engine"), "not a directory"),
        (("--engine", ".", "--qa-target", "127.0.0.1:1"), "exclude each other"),
        (("--budgets", "llm=3ms"), "unknown stage"),
        (("--port", "70000"), "port"),
        (("--asr-final-latency-ms", "-5"), "latencies"),
        (("--qa-target", "127.0.0.1:1", "--qa-connections", "0"), "QA connections must be 1..64, not 0"),
    ],
)
def test_bad_flags_are_one_usage_error_and_exit_2(args: tuple[str, ...], message: str) -> None:
    result = subprocess.run(pipeline_command(*args), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]
