"""The abstention threshold, tuned on the first half of the SQuAD v2.0 dev articles and reported on the second.

A question's *null margin* is its null logit minus its best span logit (`Prediction.null_logit` - `best.logit`);
the decoder abstains when the margin exceeds `DecoderConfig.null_threshold`. Fed to the official v2.0 metric as
the no-answer "probability" (with every question answered by its best span), the metric's `best_f1_thresh` is
exactly that threshold: questions whose margin exceeds it become "no answer". Plain numpy and the metric: no torch.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from realtime_qa.qacore.confidence import CALIBRATION_KEY, ConfidenceCalibration, confidence_logit, shifted_probability
from realtime_qa.qacore.decoding import Prediction
from realtime_qa.qacore.squad import Question, SquadDataset
from realtime_qa.qacore.squad_metric import evaluate_v2, exact_match, gold_answers_v2

CONFIDENCE_BUCKETS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0000001)


@dataclass(frozen=True)
class QuestionScore:
    """What threshold tuning needs of one decoded v2.0 question (decoded with allow_null)."""

    text: str  # best span text
    null_margin: float  # null logit - best span logit
    span_probability: float  # best span's probability among the n-best and the null answer
    null_probability: float

    @classmethod
    def of(cls, prediction: Prediction) -> QuestionScore:
        if not prediction.nbest:
            return cls("", float("inf"), 0.0, 1.0)
        best = prediction.nbest[0]
        return cls(best.text, prediction.null_logit - best.logit, best.score, prediction.null_probability)


def tune_threshold(dataset: SquadDataset, scores: Mapping[str, QuestionScore]) -> float:
    """The null threshold (in logits) with the best F1 on `dataset` (the first half of v2.0 dev)."""
    texts = {qid: score.text for qid, score in scores.items()}
    margins = {qid: score.null_margin for qid, score in scores.items()}
    return float(evaluate_v2(dataset, texts, margins)["best_f1_thresh"])


def scores_at(dataset: SquadDataset, scores: Mapping[str, QuestionScore], threshold: float) -> dict[str, float]:
    """Official v2.0 scores on `dataset` when abstaining at null margin > `threshold`, plus best_f1 (oracle)."""
    texts = {qid: score.text for qid, score in scores.items()}
    margins = {qid: score.null_margin for qid, score in scores.items()}
    values = evaluate_v2(dataset, texts, margins, threshold).values
    return {key: float(value) for key, value in values.items()}


def returned_confidence(score: QuestionScore, threshold: float) -> tuple[bool, float]:
    """(abstains, confidence) at `threshold`, the confidence being the probability of what the decoder returns
    once its null logit is shifted by -threshold (so that abstaining at margin > threshold is the same as the
    null answer outranking the best span): p_null' = p_null e^-t / (p_null e^-t + 1 - p_null), spans likewise.
    The one definition is `qacore.confidence.shifted_probability` (what the decoder returns, before the Platt
    scaling fitted here)."""
    abstains = score.null_margin > threshold
    return abstains, shifted_probability(score.span_probability, score.null_probability, abstains, threshold)


def _correct(question: Question, score: QuestionScore, abstains: bool) -> bool:
    if abstains:
        return not question.has_answer
    return any(exact_match(score.text, gold) for gold in gold_answers_v2(question.answer_texts))


def fit_platt(dataset: SquadDataset, scores: Mapping[str, QuestionScore], threshold: float) -> tuple[float, float]:
    """(a, b) of P(right) = sigmoid(a * logit(confidence) + b), fit by logistic regression (Newton steps) on
    `dataset` (the first half of v2.0 dev): what the returned confidence must be mapped through to be calibrated.
    Shipped as config.json `qa_confidence_calibration` (`set_confidence_calibration`), applied by the decoder
    through `qacore.confidence.ConfidenceCalibration`."""
    features, labels = [], []
    for _, question in dataset.questions():
        score = scores[question.id]
        abstains, confidence = returned_confidence(score, threshold)
        features.append(confidence_logit(confidence))
        labels.append(float(_correct(question, score, abstains)))
    x = np.stack([np.asarray(features), np.ones(len(features))], axis=1)
    y = np.asarray(labels)
    weights = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-(x @ weights)))
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        weights -= np.linalg.solve(hessian, x.T @ (p - y))
    return float(weights[0]), float(weights[1])


def reliability_table(
    dataset: SquadDataset,
    scores: Mapping[str, QuestionScore],
    threshold: float,
    platt: tuple[float, float] | None = None,
) -> list[dict[str, Any]]:
    """Accuracy (exact match; an abstention is right iff the question is unanswerable) by confidence bucket.
    Confidence: `returned_confidence`, mapped through `platt` (a, b) when given."""
    calibration = ConfidenceCalibration(*platt) if platt is not None else None
    rows: list[dict[str, Any]] = [
        {"low": low, "high": min(high, 1.0), "count": 0, "correct": 0, "confidence_sum": 0.0}
        for low, high in itertools.pairwise(CONFIDENCE_BUCKETS)
    ]
    for _, question in dataset.questions():
        score = scores[question.id]
        abstains, confidence = returned_confidence(score, threshold)
        if calibration is not None:
            confidence = calibration.apply(confidence)
        correct = _correct(question, score, abstains)
        for row in rows:
            if confidence < row["high"] or row["high"] == 1.0:
                row["count"] += 1
                row["correct"] += int(correct)
                row["confidence_sum"] += confidence
                break
    return [
        {
            "bucket": f"[{row['low']:.1f}, {row['high']:.1f}{']' if row['high'] == 1.0 else ')'}",
            "questions": row["count"],
            "mean_confidence": row["confidence_sum"] / row["count"] if row["count"] else 0.0,
            "accuracy": row["correct"] / row["count"] if row["count"] else 0.0,
        }
        for row in rows
    ]


def calibrate(dataset: SquadDataset, scores: Mapping[str, QuestionScore]) -> dict[str, object]:
    """Tune on the first half of the articles, report on the second (and on the first, for reference)."""
    first, second = dataset.article_half("first"), dataset.article_half("second")
    threshold = tune_threshold(first, scores)
    platt = fit_platt(first, scores, threshold)
    return {
        "null_threshold": threshold,
        "tuned_on": f"first {len(first.articles)} articles ({first.num_questions} questions)",
        "reported_on": f"last {len(second.articles)} articles ({second.num_questions} questions)",
        "first_half": scores_at(first, scores, threshold),
        "second_half": scores_at(second, scores, threshold),
        "second_half_threshold_0": scores_at(second, scores, 0.0),
        "reliability_second_half": reliability_table(second, scores, threshold),
        "platt_first_half": platt,
        "reliability_second_half_platt": reliability_table(second, scores, threshold, platt),
        "second_half_answerable_refused": answerable_refused(second, scores, threshold),
    }


def answerable_refused(dataset: SquadDataset, scores: Mapping[str, QuestionScore], threshold: float) -> float:
    """The share of `dataset`'s answerable questions on which the model abstains at `threshold` (what the model
    card calls refused answerable questions; 1 - NoAns_f1 / 100 is the other side, unanswerable ones answered)."""
    answerable = [question for _, question in dataset.questions() if question.has_answer]
    if not answerable:
        return 0.0
    return sum(scores[question.id].null_margin > threshold for question in answerable) / len(answerable)


def write_scores(path: Path, scores: Mapping[str, QuestionScore]) -> None:
    path.write_text(json.dumps({qid: asdict(score) for qid, score in scores.items()}) + "\n", encoding="utf-8")


def read_scores(path: Path) -> dict[str, QuestionScore]:
    return {qid: QuestionScore(**raw) for qid, raw in json.loads(path.read_text(encoding="utf-8")).items()}


def set_null_threshold(model_dir: Path, threshold: float) -> Path:
    """Write `threshold` into the model's config.json as `qa_null_threshold` (what the builder carries to the
    engine and the decoder uses by default wherever abstaining is allowed)."""
    from realtime_qa.builder.checkpoint import NULL_THRESHOLD_KEY

    path = model_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config[NULL_THRESHOLD_KEY] = float(threshold)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def set_confidence_calibration(model_dir: Path, platt: tuple[float, float]) -> Path:
    """Write the Platt scaling `platt` (a, b from `fit_platt`) into the model's config.json as
    `qa_confidence_calibration` (what the builder carries to the engine and the decoder applies to the
    returned confidence wherever abstaining is allowed)."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config[CALIBRATION_KEY] = ConfidenceCalibration(*platt).to_dict()
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path
