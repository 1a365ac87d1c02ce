"""Comparing a served answer with the prediction the same engine path gives in process."""

from __future__ import annotations

from typing import Any

import pytest
from realtime_qa.pipeline.client import Answer
from realtime_qa.qacore.decoding import Prediction
from realtime_qa.qacore.squad_metric import evaluate


def assert_same_best(served: Answer, expected: Prediction, passage: str) -> None:
    """The served best span is the expected one (text, code-point offsets, score to 1e-3), cut from `passage`."""
    assert expected.best is not None and served.best is not None
    assert (served.best.text, served.best.start, served.best.end) == (
        expected.best.text,
        expected.best.start,
        expected.best.end,
    )
    assert served.best.score == pytest.approx(expected.best.score, abs=1e-3)
    assert passage[served.best.start : served.best.end] == served.best.text


def assert_fp16_answers_agree(dataset: Any, reference: dict[str, str], other: dict[str, str], label: str) -> None:
    """Answers (text by question id) of the fp16 GPU engine through two paths: fp16 may round a row differently in a
    batch of another shape, so a near tie may flip; 99 % must be identical and SQuAD F1 within 0.1."""
    same = sum(other[qid] == text for qid, text in reference.items())
    runs = (("ref", reference), ("other", other))
    f1 = {name: float(evaluate(dataset, answers, "1.1")["f1"]) for name, answers in runs}
    print(f"{len(reference)} questions: {same} identical; F1 {f1['ref']:.3f}, {label} {f1['other']:.3f}")
    assert same >= 0.99 * len(reference)
    assert abs(f1["ref"] - f1["other"]) <= 0.1
