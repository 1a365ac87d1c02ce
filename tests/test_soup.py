"""Model soups of abstention runs (`qa-train soup`) and the device calls' selection rule (`training.collect`).
CPU, tiny random BERTs saved as finished runs, the shipped tokenizer and a few real SQuAD dev articles."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from realtime_qa.training.collect import collect
from test_teacher_distillation import TINY, tiny_weights

pytest.importorskip("torch")


def save_abstain_run(run_dir: Path, name: str, weights: dict[str, np.ndarray], tokenizer_dir: Path, start: str) -> Path:
    """A finished `qa-train abstain` run as `qa-train soup` reads it: RUN/metrics.json and RUN/model/."""
    from realtime_qa.builder.hf_export import save_hf_model
    from realtime_qa.training.config import TrainConfig

    save_hf_model(run_dir / "model", TINY, weights, tokenizer_dir)
    summary = {
        "config": TrainConfig(name, epochs=1, learning_rate=3e-5).to_dict(),
        "start_model_sha256": start,
        "tuned": {"v1.1": {"f1": 1.0}},
        "train_seconds": 10.0,
        "device": "cpu",
        "torch": "test",
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary), encoding="utf-8")
    return run_dir


def test_average_weights_is_the_elementwise_mean_and_refuses_mismatches() -> None:
    from realtime_qa.training.soup import average_weights

    a, b, c = tiny_weights(1), tiny_weights(2), tiny_weights(3)
    mean = average_weights([a, b, c])
    assert set(mean) == set(a)
    for name in a:
        np.testing.assert_allclose(mean[name], (a[name] + b[name] + c[name]) / 3, rtol=1e-6, atol=1e-7)
        assert mean[name].dtype == np.float32
    with pytest.raises(ValueError, match="at least 2"):
        average_weights([a])
    with pytest.raises(ValueError, match="other tensors"):
        average_weights([a, {k: v for k, v in b.items() if k != "qa_outputs.bias"}])
    name = next(iter(a))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        average_weights([a, {**b, name: np.zeros((1, 1), np.float32)}])


@pytest.fixture()
def small_squad(squad_dir: Path, tmp_path: Path) -> Path:
    """dev-v1.1 (2 articles) and dev-v2.0 (4 articles: two per half) cut from the real files."""
    out = tmp_path / "squad"
    out.mkdir()
    for name, articles in (("dev-v1.1.json.gz", 2), ("dev-v2.0.json.gz", 4)):
        raw = json.loads(gzip.decompress((squad_dir / name).read_bytes()))
        raw["data"] = raw["data"][:articles]
        (out / name).write_bytes(gzip.compress(json.dumps(raw).encode()))
    return out


def test_soup_scores_and_exports_the_mean_of_its_ingredients(
    shipped_model_dir: Path, small_squad: Path, tmp_path: Path
) -> None:
    from realtime_qa.builder.checkpoint import load_checkpoint
    from realtime_qa.training.runs import RunPaths
    from realtime_qa.training.soup import run_soup

    runs = [
        save_abstain_run(tmp_path / f"run{seed}", f"run{seed}", tiny_weights(seed), shipped_model_dir, "same")
        for seed in (1, 2)
    ]
    soup_dir = tmp_path / "soup"
    summary = run_soup("soup_12", runs, RunPaths(small_squad, shipped_model_dir, soup_dir, soup_dir))

    # What a run reports, so the selection rule and the ablation table read a soup like any run.
    v2 = summary["tuned"]["v2.0"]
    assert {"null_threshold", "first_half", "second_half"} <= set(v2)
    assert v2["tuned_on"].startswith("first 2 articles") and v2["reported_on"].startswith("last 2 articles")
    assert 0.0 <= summary["tuned"]["v1.1"]["f1"] <= 100.0
    assert summary["config"]["name"] == "soup_12"
    assert [part["run"] for part in summary["soup_of"]] == ["run1", "run2"]
    assert json.loads((soup_dir / "metrics.json").read_text())["soup_of"][1]["run"] == "run2"
    assert (soup_dir / "v2_scores.json").is_file() and (soup_dir / "export" / "export.json").is_file()
    # The exported weights are the mean of the ingredients' saved (float16) weights, rounded to float16.
    saved = [load_checkpoint(run / "model").weights for run in runs]
    soup = load_checkpoint(soup_dir / "model").weights
    for name, value in soup.items():
        expected = ((saved[0][name] + saved[1][name]) / 2).astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(value, expected, atol=1e-3, err_msg=name)


def test_soup_refuses_runs_of_different_start_models_and_unfinished_runs(
    shipped_model_dir: Path, small_squad: Path, tmp_path: Path
) -> None:
    from realtime_qa.training.runs import RunPaths
    from realtime_qa.training.soup import run_soup

    one = save_abstain_run(tmp_path / "one", "one", tiny_weights(1), shipped_model_dir, "start-a")
    other = save_abstain_run(tmp_path / "other", "other", tiny_weights(2), shipped_model_dir, "start-b")
    paths = RunPaths(small_squad, shipped_model_dir, tmp_path / "soup", tmp_path / "soup")
    with pytest.raises(ValueError, match="different models"):
        run_soup("soup", [one, other], paths)
    (tmp_path / "cut").mkdir()
    with pytest.raises(FileNotFoundError, match="not a finished run"):
        run_soup("soup", [one, tmp_path / "cut"], paths)
    assert not (tmp_path / "soup").exists()


def _finished_run(work: Path, name: str, v1: float, first_half: float) -> None:
    run = work / "runs" / name
    (run / "export").mkdir(parents=True)
    (run / "export" / "model.tar.part00").write_bytes(name.encode())
    second = {"f1": 60.0, "NoAns_f1": 70.0, "HasAns_f1": 50.0}
    tuned = {
        "v1.1": {"f1": v1},
        "v2.0": {"null_threshold": -5.0, "first_half": {"f1": first_half}, "second_half": second},
    }
    (run / "metrics.json").write_text(json.dumps({"start_model_sha256": "abc" * 10, "tuned": tuned}))


def test_collect_chooses_the_best_first_half_among_candidates_that_keep_v1(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    _finished_run(work, "teacher", 86.9, 70.0)  # best of all, but a training aid: never a candidate
    _finished_run(work, "below_v1", 86.1, 69.0)  # loses too much on v1.1
    _finished_run(work, "good", 86.3, 67.5)
    _finished_run(work, "better", 86.2, 67.9)
    (work / "runs" / "cut").mkdir()
    names = ["teacher", "below_v1", "good", "better", "cut"]
    lines = collect(out, work, 86.2, 66.78, names, names[1:])
    assert (out / "chosen.txt").read_text() == "better\n"
    assert (out / "model.tar.part00").read_bytes() == b"better"
    assert "cut: did not finish" in lines and (out / "summary.txt").read_text().splitlines() == lines

    again = tmp_path / "again"
    again.mkdir()
    lines = collect(again, work, 86.2, 67.9, names, names[1:])  # must beat the shipped model, not tie it
    assert not (again / "chosen.txt").exists() and not (again / "model.tar.part00").exists()
    assert lines[-1] == "it does not beat the shipped model: no weights come back"
