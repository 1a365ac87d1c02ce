"""`qa-bench cpu` refuses a malformed `--engine LABEL=DIR` with one line, before building anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from realtime_qa.benchmarks.cli import main


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("previous", "--engine expects LABEL=DIR, got 'previous'"),
        ("=/tmp", "--engine expects LABEL=DIR, got '=/tmp'"),
        ("previous={missing}", "--engine previous: no engine (meta.json) in {missing}"),
    ],
)
def test_a_bad_extra_engine_is_one_line(
    value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing")
    assert main(["cpu", "--engine", value.format(missing=missing), "--json-out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qa-bench cpu: error: {message.format(missing=missing)}"]
    assert not (tmp_path / "r.json").exists()
