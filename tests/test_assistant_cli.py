"""`qa-assistant` as a user runs it: answers, JSON lines, files, the prompt, and one-line errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from realtime_qa.pipeline.assistant_cli import DEMO_PASSAGE, main
from realtime_qa.qacore.engine import EngineMeta


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_answers_the_two_example_questions(engine_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "-e", str(engine_dir), "--demo", "--json")
    assert code == 0, err
    first, second = (json.loads(line) for line in out.splitlines())
    assert "high performance deep learning inference platform" in first["answer"]
    assert second["answer"].startswith("parsers to import models")
    for row in (first, second):
        assert DEMO_PASSAGE[row["start"] : row["end"]] == row["answer"]
        assert 0 < row["score"] <= 1
        assert set(row["timings_ms"]) == {"tokenize", "infer", "decode", "total"}
        assert row["timings_ms"]["total"] >= row["timings_ms"]["infer"] > 0


def test_text_output_shows_answer_score_and_timings(engine_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "-e", str(engine_dir), "-p", DEMO_PASSAGE, "-q", "What is TensorRT?")
    assert code == 0
    assert "Answer: 'a high performance deep learning inference platform" in out
    assert "score" in out and "tokenize" in out and "infer" in out and "decode" in out


def test_passage_and_question_files(engine_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "passage.txt").write_text(DEMO_PASSAGE, encoding="utf-8")
    (tmp_path / "questions.txt").write_text("What is TensorRT?\n\nWhat is included in TensorRT?\n", encoding="utf-8")
    code, out, _ = run_cli(
        capsys, "-e", str(engine_dir), "-pf", str(tmp_path / "passage.txt"), "-qf", str(tmp_path / "questions.txt")
    )
    assert code == 0 and out.count("Question:") == 2


def test_interactive_prompt_until_quit(
    engine_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("What is TensorRT?\n\n   \nquit\nWhat is ignored?\n"))
    code, out, err = run_cli(capsys, "-e", str(engine_dir), "-p", DEMO_PASSAGE)
    assert code == 0
    assert out.count("Question:") == 1 and "What is ignored" not in out
    assert "exit or quit" in err


def test_squad_file_writes_predictions(
    engine_dir: Path, squad_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from realtime_qa.qacore.squad import read_dataset
    from realtime_qa.qacore.squad_metric import evaluate_v1

    dataset = read_dataset(squad_dir / "dev-v1.1.json.gz").head(60)
    small = tmp_path / "dev-head.json"
    small.write_text(json.dumps({"version": "1.1", "data": dataset.raw_articles}), encoding="utf-8")
    out_file = tmp_path / "predictions.json"
    code, _, err = run_cli(capsys, "-e", str(engine_dir), "-sq", str(small), "-o", str(out_file))
    assert code == 0, err
    predictions = json.loads(out_file.read_text(encoding="utf-8"))
    assert len(predictions) == 60
    assert evaluate_v1(dataset, predictions)["f1"] > 60


def test_a_long_passage_is_answered_from_the_right_window(engine_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """End to end over 13 windows; the window logic at 100,000 words is tested without the engine
    (test_features.py, test_decoding.py)."""
    filler = " ".join(f"Item {i} weighs {i % 97} grams." for i in range(300))  # 1,500 words
    passage = filler + " The lighthouse keeper was named Ferdinand Oakley."
    code, out, err = run_cli(
        capsys, "-e", str(engine_dir), "-p", passage, "-q", "Who was the lighthouse keeper?", "--json"
    )
    assert code == 0, err
    assert "Ferdinand Oakley" in json.loads(out)["answer"]


def test_sequence_length_follows_the_engine(
    engine_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An engine built for 128 tokens (`qa-build -s 128`) is used at 128 without -s; -s 64 is honoured."""
    short = tmp_path / "engine-128"
    shutil.copytree(engine_dir, short)
    meta = EngineMeta.read(short)
    raw = json.loads(meta.to_json())
    raw["sequence_lengths"] = [128]
    (short / "meta.json").write_text(json.dumps(raw), encoding="utf-8")
    code, out, err = run_cli(capsys, "-e", str(short), "--demo", "--json")
    assert code == 0, err
    assert "high performance deep learning inference platform" in json.loads(out.splitlines()[0])["answer"]
    code, out, err = run_cli(capsys, "-e", str(short), "--demo", "--json", "-s", "64")
    assert code == 0, err
    code, out, err = run_cli(capsys, "-e", str(short), "--demo", "-s", "384")
    assert code == 2 and out == "" and "exceeds the engine's 128" in err and err.count("\n") == 1


def test_passage_file_is_read_only_up_to_the_limit(engine_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """/dev/zero never ends: reading stops at the size limit (4 bytes per allowed code point) with one line."""
    code, out, err = run_cli(capsys, "-e", str(engine_dir), "-pf", "/dev/zero", "-q", "What?")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "larger than the limit" in err


def test_deeply_nested_squad_json_is_one_line_error(
    engine_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    code, out, err = run_cli(capsys, "-e", str(engine_dir), "-sq", str(deep))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "nested too deeply" in err


def test_non_utf8_vocabulary_is_one_line_error(
    engine_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(b"[PAD]\n[UNK]\ncaf\xe9\n")
    code, out, err = run_cli(capsys, "-e", str(engine_dir), "-v", str(vocab), "--demo")
    assert code == 3 and out == ""
    assert err.count("\n") == 1 and "not valid UTF-8" in err


def test_bad_utf8_passage_file_is_one_line_error(
    engine_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Café au lait".encode("latin-1"))
    code, out, err = run_cli(capsys, "-e", str(engine_dir), "-pf", str(bad), "-q", "What?")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "not valid UTF-8" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-p", DEMO_PASSAGE, "-q", ""], "question is empty"),
        (["-p", "   ", "-q", "What?"], "passage is empty"),
        (["-q", "What?"], "no passage"),
        (["-p", DEMO_PASSAGE, "-q", "What?", "--n-best-size", "-1"], "n_best_size"),
        (["-p", DEMO_PASSAGE, "-q", "What?", "--max-answer-length", "0"], "max_answer_length"),
        (["-p", DEMO_PASSAGE, "-q", "What?", "--doc-stride", "0"], "doc_stride"),
        (["-p", DEMO_PASSAGE, "-q", "What?", "-s", "100000"], "exceeds the engine's 384"),
        (["-p", DEMO_PASSAGE, "-q", "What?", "-s", "abc"], "invalid int value: 'abc'"),
        (["-p", DEMO_PASSAGE, "-q", "What?", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["-p", DEMO_PASSAGE, "-q", "What?", "--threads", "-2"], "threads"),
        (["-p", DEMO_PASSAGE, "-q", "What?", "--threads", "100000"], "threads must be in [0, "),
        (["-p", DEMO_PASSAGE, "-q", "What?", "--precision", "fp32"], "--precision chooses the default engine"),
        (["-p", DEMO_PASSAGE, "-q", "What?", "-o", "x.json"], "needs -sq"),
        (["-pf", "/nonexistent/passage.txt", "-q", "What?"], "not found"),
        (["-p", DEMO_PASSAGE, "-q", "What?", "--log-level", "bogus"], "--log-level"),
    ],
)
def test_bad_input_is_one_line_error_with_exit_2(
    engine_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    try:
        code, out, err = run_cli(capsys, "-e", str(engine_dir), *argv)
    except SystemExit as exit_:  # argparse's own errors exit from parse_args
        code, (out, err) = int(exit_.code or 0), capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and err.startswith("qa-assistant: error:")


def test_missing_engine_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "-e", str(tmp_path / "nope"), "--demo")
    assert code == 3 and err.count("\n") == 1 and "not found" in err


def test_engine_of_another_vocabulary_is_refused(
    engine_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "engine"
    shutil.copytree(engine_dir, other)
    meta = EngineMeta.read(other)
    (other / "meta.json").write_text(meta.to_json().replace(meta.vocab_sha256, "0" * 64), encoding="utf-8")
    code, _, err = run_cli(capsys, "-e", str(other), "--demo")
    assert code == 3 and err.count("\n") == 1 and "does not match" in err


def test_unwritable_engine_cache_is_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QA_ENGINE_CACHE", "/proc/no-such-dir/engines")  # /proc refuses new directories
    code, out, err = run_cli(capsys, "--demo")
    assert code == 3 and out == ""
    assert err.count("\n") == 1 and err.startswith("qa-assistant: error:")
