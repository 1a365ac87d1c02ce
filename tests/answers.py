"""Comparing a served answer with the prediction the same engine path gives in process."""

from __future__ import annotations

import pytest
from realtime_qa.pipeline.client import Answer
from realtime_qa.qacore.decoding import Prediction


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
