"""`qa-assistant converse`: a scripted conversation (text and a WAV turn) as one JSON object per turn."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import pytest

PASSAGE = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
    "their leader Rollo, agreed to swear fealty to King Charles III of West Francia."
)
STAGE_KEYS = {"name", "start_ms", "duration_ms", "budget_ms", "over_budget"}


REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def converse(
    *args: str, stdin: str = "", timeout_s: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-c",
        "import sys; from realtime_qa.pipeline.assistant_cli import main; sys.exit(main())",
    ]
    return subprocess.run(
        [*command, "converse", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=cwd,
    )


@pytest.fixture
def script(tmp_path: Path) -> tuple[Path, Path]:
    passage = tmp_path / "passage.txt"
    passage.write_text(PASSAGE, encoding="utf-8")
    with wave.open(str(tmp_path / "region.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes(b"\x00\x00" * 16_000)
    (tmp_path / "region.txt").write_text("What region did the Normans give their name to?\n", encoding="utf-8")
    turns = tmp_path / "turns.txt"
    turns.write_text("Who was the Norse leader?\n\n# spoken:\nregion.wav\nWho did they swear fealty to?\n")
    return turns, passage


def test_turns_file_with_json_prints_one_object_per_turn(script: tuple[Path, Path], engine_dir: Path) -> None:
    turns, passage = script
    # a generous QA budget: this checks the CLI, not the engine's latency on a loaded machine
    result = converse(
        "--turns-file", str(turns), "-pf", str(passage), "--json", "--engine", str(engine_dir), "--budgets", "qa=5s"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    objects = [json.loads(line) for line in lines]
    assert [o["turn"] for o in objects] == [1, 2, 3]
    assert [o["transcript"] for o in objects] == [
        "Who was the Norse leader?",
        "What region did the Normans give their name to?",
        "Who did they swear fealty to?",
    ]
    assert objects[0]["answer"] == "Rollo" and objects[1]["answer"] == "Normandy"
    assert "Charles III" in objects[2]["answer"]
    for turn in objects:
        assert turn["abstained"] is False and turn["errors"] == []
        assert turn["response"].startswith(turn["answer"]) or turn["answer"] in turn["response"]
        assert PASSAGE[turn["start"] : turn["end"]] == turn["answer"]
        assert [stage["name"] for stage in turn["stages"] if "." not in stage["name"]] == ["asr", "qa", "response"]
        assert all(set(stage) == STAGE_KEYS for stage in turn["stages"])
        qa = next(stage for stage in turn["stages"] if stage["name"] == "qa")
        assert qa["budget_ms"] == 5000.0 and qa["over_budget"] is False
        top = sum(stage["duration_ms"] for stage in turn["stages"] if "." not in stage["name"])
        assert turn["total_ms"] == pytest.approx(top + turn["unattributed_ms"], rel=1e-6)


def test_the_table_output_names_every_stage(engine_dir: Path) -> None:
    result = converse(
        "-p", PASSAGE, "--engine", str(engine_dir), "--budgets", "qa=5s", stdin="Who was the Norse leader?\nquit\n"
    )
    assert result.returncode == 0, result.stderr
    assert "Answer:    'Rollo'" in result.stdout and "Assistant: Rollo." in result.stdout
    for row in ("asr", "qa", "qa.infer", "qa.network", "response", "turn total"):
        assert row in result.stdout
    assert "\x1b[" not in result.stdout  # no colour when stdout is not a terminal


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--turns-file", "turns.txt"), "no passage"),
        (("-pf", "missing.txt", "--turns-file", "turns.txt"), "not found"),
        (("-p", "x", "-pf", "passage.txt", "--turns-file", "turns.txt"), "not both"),
        (("-p", "x", "--turns-file", "missing-turns.txt"), "not found"),
        (("-p", "x", "--turns-file", "bad-wav.txt"), "no such WAV"),
        (("-p", "x", "--turns-file", "empty.txt"), "has no turns"),
        (("-p", "x", "--budgets", "llm=5ms", "--turns-file", "turns.txt"), "unknown stage"),
        (("-p", "x", "--target", "127.0.0.1:1", "--engine", ".", "--turns-file", "turns.txt"), "--target"),
    ],
)
def test_bad_inputs_are_one_line_and_exit_2(script: tuple[Path, Path], args: tuple[str, ...], message: str) -> None:
    turns, _ = script
    base = turns.parent
    (base / "bad-wav.txt").write_text("nowhere.wav\n")
    (base / "empty.txt").write_text("\n# nothing\n")
    resolved = [str(base / arg) if arg.endswith(".txt") else arg for arg in args]
    result = converse(*resolved, timeout_s=60)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert result.stdout == ""


def test_an_unreachable_target_is_one_line_and_exit_1(script: tuple[Path, Path]) -> None:
    turns, passage = script
    result = converse("--turns-file", str(turns), "-pf", str(passage), "--target", "127.0.0.1:1", timeout_s=60)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "UNAVAILABLE" in result.stderr


def test_the_shipped_examples_converse_from_the_repo_root(engine_dir: Path) -> None:
    """`make converse` (plus --json): the README's example turns, one of them spoken (a real espeak-ng WAV)."""
    with wave.open(str(EXAMPLES / "question.wav")) as spoken:
        assert (spoken.getframerate(), spoken.getnchannels(), spoken.getsampwidth()) == (16_000, 1, 2)
        assert spoken.getnframes() > 16_000  # a spoken question lasts over a second
    assert (EXAMPLES / "question.wav").stat().st_size < 100_000
    args = ("--turns-file", "examples/turns.txt", "-pf", "examples/passage.txt", "--json")
    result = converse(*args, "--engine", str(engine_dir), "--budgets", "qa=5s", cwd=REPO)
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["turn"] for o in objects] == [1, 2, 3, 4]
    assert objects[3]["transcript"] == (EXAMPLES / "question.txt").read_text(encoding="utf-8").strip()
    passage = (EXAMPLES / "passage.txt").read_text(encoding="utf-8")
    answers = {o["transcript"]: o["answer"] for o in objects}
    assert answers["Who founded the Harbor Light Library?"] == "Margaret Olsen"
    assert answers["When did the library move into the old customs house?"] == "1968"
    assert "Lantern Festival" in objects[3]["answer"]
    for turn in objects:
        assert {"turn", "transcript", "answer", "abstained", "response", "stages", "total_ms"} <= set(turn)
        assert turn["errors"] == [] and turn["response"]
        assert turn["abstained"] or passage[turn["start"] : turn["end"]] == turn["answer"]
        assert all(set(stage) == STAGE_KEYS for stage in turn["stages"])
