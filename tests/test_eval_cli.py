"""`qa-eval`: stdout is the official scripts' JSON, bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from realtime_qa.qacore.eval_cli import main
from realtime_qa.qacore.squad import read_dataset, read_na_probs, read_predictions
from realtime_qa.qacore.squad_metric import evaluate

REPO = Path(__file__).resolve().parents[1]
SQUAD_DIR = REPO.parent / "shared" / "data" / "squad"
LEADERBOARD = SQUAD_DIR / "leaderboard"
DEV = {"v1.1": SQUAD_DIR / "dev-v1.1.json.gz", "v2.0": SQUAD_DIR / "dev-v2.0.json.gz"}


def qa_eval(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The real console entry, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "realtime_qa.qacore.eval_cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def official() -> dict[str, Any]:
    return json.loads((LEADERBOARD / "official_scores.json").read_text(encoding="utf-8"))


def printed(expected: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in expected.items() if not key.startswith("_") and key != "source_path"}


def official_stdout(version: str, name: str) -> str:
    """What the official script prints: json.dumps (v1.1) or json.dumps(indent=2) (v2.0), then a newline."""
    return json.dumps(printed(official()[version][name]), indent=None if version == "v1.1" else 2) + "\n"


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def small_v2(tmp_path: Path) -> tuple[Path, Path]:
    """Two answerable and two unanswerable questions, with predictions [right, half right, wrong, right]."""
    qas = [
        {"id": "q1", "question": "Capital of France?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "q2", "question": "What fruit?", "answers": [{"text": "red apple", "answer_start": 6}]},
        {"id": "q3", "question": "Capital of Mars?", "answers": [], "is_impossible": True},
        {"id": "q4", "question": "Moon king?", "answers": [], "is_impossible": True},
    ]
    dataset = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Paris red apple", "qas": qas}]}]}
    predictions = {"q1": "Paris", "q2": "apple", "q3": "London", "q4": ""}
    return write_json(tmp_path / "data.json", dataset), write_json(tmp_path / "preds.json", predictions)


# --- scoring mode: the official numbers ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1.1", "v2.0"])
def test_console_entry_prints_official_json(version: str) -> None:
    name = next(iter(official()[version]))
    result = qa_eval(DEV[version], LEADERBOARD / name)
    assert result.returncode == 0, result.stderr
    assert result.stdout == official_stdout(version, name)


@pytest.mark.parametrize(
    ("version", "name"),
    [(version, name) for version in ("v1.1", "v2.0") for name in (official()[version] if LEADERBOARD.is_dir() else [])],
)
def test_every_leaderboard_file_through_main(
    version: str, name: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_file = tmp_path / "eval.json"
    assert main([str(DEV[version]), str(LEADERBOARD / name), "--out-file", str(out_file)]) == 0
    captured = capsys.readouterr()
    assert captured.out == official_stdout(version, name)
    assert out_file.read_text(encoding="utf-8") == official_stdout(version, name)
    missing = official()[version][name].get("_missing_predictions", 0)
    assert captured.err.count("no prediction for question") == min(missing, 10)
    if missing > 10:
        assert f"and {missing - 10} more questions without a prediction" in captured.err


def test_na_prob_file_and_threshold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset, predictions = small_v2(tmp_path)
    na_probs = write_json(tmp_path / "na.json", {"q1": 0.1, "q2": 0.6, "q3": 0.8, "q4": 0.3})
    assert main([str(dataset), str(predictions), "--na-prob-file", str(na_probs)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert list(scores) == [
        "exact", "f1", "total",
        "HasAns_exact", "HasAns_f1", "HasAns_total",
        "NoAns_exact", "NoAns_f1", "NoAns_total",
        "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh",
    ]  # fmt: skip
    assert (scores["exact"], scores["best_exact"], scores["best_exact_thresh"]) == (50.0, 75.0, 0.1)
    assert main([str(dataset), str(predictions), "--na-prob-file", str(na_probs), "--na-prob-thresh", "0.5"]) == 0
    at_half = json.loads(capsys.readouterr().out)
    assert (at_half["exact"], at_half["HasAns_exact"], at_half["NoAns_exact"]) == (75.0, 50.0, 100.0)


def test_version_override_warns_and_scores_by_the_chosen_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {
        "version": "1.1",
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": "the cat",
                        "qas": [{"id": "q", "question": "What?", "answers": [{"text": "the", "answer_start": 0}]}],
                    }
                ],
            }
        ],
    }
    dataset = write_json(tmp_path / "d.json", data)
    predictions = write_json(tmp_path / "p.json", {"q": ""})
    assert main([str(dataset), str(predictions)]) == 0
    assert capsys.readouterr().out == '{"exact_match": 100.0, "f1": 0.0}\n'
    assert main([str(dataset), str(predictions), "--version", "2.0"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["f1"] == 100.0  # v2.0: gold "the" is dropped, gold [""] matches ""
    assert "scored as v2.0" in captured.err


# --- bad input: one line on stderr, exit status 2, nothing on stdout ----------------------------------


def bad_input_files(tmp_path: Path) -> dict[str, str]:
    """Write the malformed files; returns the placeholders of BAD_INPUTS."""
    dataset, predictions = small_v2(tmp_path)
    (tmp_path / "garbage.json.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    whole = gzip.compress(dataset.read_bytes())
    (tmp_path / "cut.json.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "bad.json").write_text('{"version": "v2.0", "data": [', encoding="utf-8")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    write_json(tmp_path / "list.json", [1, 2])
    write_json(tmp_path / "noqas.json", {"version": "v2.0", "data": [{"paragraphs": [{"context": "c"}]}]})
    write_json(tmp_path / "predlist.json", ["Paris"])
    write_json(tmp_path / "prednum.json", {"q1": 1})
    write_json(tmp_path / "na_bad.json", {"q1": "high"})
    write_json(tmp_path / "na_short.json", {"q1": 0.5})
    write_json(tmp_path / "unknown_version.json", {**json.loads(dataset.read_text()), "version": "9"})
    write_json(tmp_path / "v1.json", {**json.loads(dataset.read_text()), "version": "1.1"})
    return {"d": str(dataset), "p": str(predictions), "t": str(tmp_path)}


# (case, argv with {d} = a valid dataset, {p} = valid predictions, {t} = the folder of bad files, message)
BAD_INPUTS = [
    ("no arguments", [], "give DATASET_FILE and PREDICTIONS_FILE"),
    ("one argument", ["{d}"], "give DATASET_FILE and PREDICTIONS_FILE"),
    ("missing dataset", ["{t}/nope.json", "{p}"], "SQuAD dataset file not found"),
    ("missing predictions", ["{d}", "{t}/nope.json"], "predictions file not found"),
    ("dataset is a directory", ["{t}", "{p}"], "is a directory"),
    ("bad gzip", ["{t}/garbage.json.gz", "{p}"], "not valid gzip data"),
    ("truncated gzip", ["{t}/cut.json.gz", "{p}"], "not valid gzip data"),
    ("bad JSON", ["{t}/bad.json", "{p}"], "is not valid JSON"),
    ("top level list", ["{t}/list.json", "{p}"], "top level is a list"),
    ("no qas", ["{t}/noqas.json", "{p}"], "has no 'qas' list"),
    ("predictions not an object", ["{d}", "{t}/predlist.json"], "must hold a JSON object"),
    ("prediction not a string", ["{d}", "{t}/prednum.json"], "answer of 'q1' must be a string"),
    ("na-prob not a number", ["{d}", "{p}", "--na-prob-file", "{t}/na_bad.json"], "must be a number"),
    ("na-prob file incomplete", ["{d}", "{p}", "--na-prob-file", "{t}/na_short.json"], "lacks 3 answered"),
    (
        "na-prob under v1.1",
        ["{d}", "{p}", "--version", "1.1", "--na-prob-file", "{t}/na_short.json"],
        "2.0 scoring only",
    ),
    ("v2 data scored as v1.1", ["{d}", "{p}", "--version", "1.1"], "has no gold answer"),
    ("unknown version field", ["{t}/unknown_version.json", "{p}"], "pass --version 1.1 or --version 2.0"),
    ("bad --version", ["{d}", "{p}", "--version", "3"], "invalid choice"),
    ("threshold not a number", ["{d}", "{p}", "--na-prob-thresh", "high"], "expected a number"),
    ("threshold nan", ["{d}", "{p}", "--na-prob-thresh", "nan"], "must be a finite number"),
    ("engine flag in scoring mode", ["{d}", "{p}", "--limit", "5"], "apply to engine mode only"),
    ("negative limit", ["--squad-json", "{d}", "--limit", "-1"], "must be >= 0, got -1"),
    ("limit not a number", ["--squad-json", "{d}", "--limit", "ten"], "expected an integer"),
    ("zero batch size", ["--squad-json", "{d}", "--batch-size", "0"], "must be >= 1, got 0"),
    ("negative threads", ["--squad-json", "{d}", "--threads", "-2"], "must be >= 0, got -2"),
    ("engine without dataset", ["--engine", "{t}"], "engine mode needs --squad-json"),
    ("engine mode with positionals", ["--squad-json", "{d}", "{d}", "{p}"], "takes no DATASET_FILE"),
    ("engine mode with na-prob file", ["--squad-json", "{d}", "--na-prob-file", "{p}"], "engine mode computes its own"),
    ("engine mode missing dataset", ["--squad-json", "{t}/nope.json"], "SQuAD dataset file not found"),
    (
        "na-prob output for v1.1",
        ["--squad-json", "{t}/v1.json", "--output-na-prob-file", "{t}/na.json"],
        "2.0 data only",
    ),
    ("engine mode limit 0", ["--squad-json", "{d}", "--limit", "0"], "no questions to answer"),
    ("unknown flag", ["{d}", "{p}", "--frobnicate"], "unrecognized arguments"),
    ("too many threads", ["--squad-json", "{d}", "--threads", "100000"], "--threads must be in [0, "),
    ("precision with an engine", ["--squad-json", "{d}", "--engine", "{t}", "--precision", "fp32"], "--precision"),
    ("precision in scoring mode", ["{d}", "{p}", "--precision", "fp32"], "apply to engine mode only"),
    ("deeply nested dataset", ["{t}/deep.json", "{p}"], "nested too deeply"),
]
ENGINE_FAILURES = [
    ("engine directory missing", ["--squad-json", "{d}", "--engine", "{t}/no-engine"], "engine directory not found"),
    ("not an engine directory", ["--squad-json", "{d}", "--engine", "{t}"], "not an engine directory"),
]


@pytest.mark.parametrize(("case", "argv", "message"), ENGINE_FAILURES, ids=[case for case, _, _ in ENGINE_FAILURES])
def test_an_engine_that_cannot_be_used_is_one_line_and_exit_3(
    case: str, argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    places = bad_input_files(tmp_path)
    assert main([arg.format(**places) for arg in argv]) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("qa-eval: error: "), captured.err
    assert message in captured.err


@pytest.mark.parametrize(("case", "argv", "message"), BAD_INPUTS, ids=[case for case, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(
    case: str, argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    places = bad_input_files(tmp_path)
    with pytest.raises(SystemExit) as exited:
        sys.exit(main([arg.format(**places) for arg in argv]))
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("qa-eval: error: "), captured.err
    assert message in captured.err


@pytest.mark.slow
def test_bad_input_through_console_entry(tmp_path: Path) -> None:
    result = qa_eval(tmp_path / "nope.json", tmp_path / "preds.json")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"qa-eval: error: SQuAD dataset file not found: {tmp_path / 'nope.json'}\n"
    result = qa_eval("--squad-json", DEV["v1.1"], "--limit", "-3")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--limit" in result.stderr


# --- engine mode ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_engine_mode_answers_the_first_questions_and_scores_them(
    engine_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    predictions_file = tmp_path / "predictions.json"
    argv = ["--engine", str(engine_dir), "--squad-json", str(DEV["v1.1"]), "--limit", "20"]
    assert main([*argv, "--output-prediction-file", str(predictions_file), "--threads", "1"]) == 0
    captured = capsys.readouterr()
    scores = json.loads(captured.out)
    assert list(scores) == ["exact_match", "f1"] and captured.out == json.dumps(scores) + "\n"
    first_20 = read_dataset(DEV["v1.1"]).head(20)
    predictions = read_predictions(predictions_file)
    assert list(predictions) == [question.id for _, question in first_20.questions()]
    for paragraph, question in first_20.questions():
        assert predictions[question.id] and predictions[question.id] in paragraph.context  # extractive
    # The printed numbers are the metric over exactly those 20 questions.
    assert evaluate(first_20, predictions).values == scores
    for row in ("questions  ", "EM  ", "F1  ", "questions/s", "latency p50 (ms)", "latency p90", "latency p99"):
        assert row in captured.err
    assert any(line.split() == ["questions", "20"] for line in captured.err.splitlines())


@pytest.mark.slow
def test_engine_mode_on_squad_v2_writes_and_uses_no_answer_probabilities(
    engine_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    predictions_file = tmp_path / "predictions.json.gz"
    argv = ["--engine", str(engine_dir), "--squad-json", str(DEV["v2.0"]), "--limit", "20", "--batch-size", "4"]
    assert main([*argv, "--output-prediction-file", str(predictions_file), "--threads", "1"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["total"] == 20 and "best_f1_thresh" in scores
    na_probs = read_na_probs(tmp_path / "predictions_na_probs.json")
    predictions = read_predictions(predictions_file)
    assert list(na_probs) == list(predictions) and len(predictions) == 20
    assert all(0.0 <= probability <= 1.0 for probability in na_probs.values())
    first_20 = read_dataset(DEV["v2.0"]).head(20)
    assert evaluate(first_20, predictions, na_probs=na_probs).values == scores
