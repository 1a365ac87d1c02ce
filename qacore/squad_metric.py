"""The SQuAD metrics, exactly as the official v1.1 and v2.0 evaluation scripts compute and print them.

Written from the definition of the metrics; the results equal the official scripts' to the last printed
digit (tests/test_squad_metric.py checks this against official leaderboard submissions). Where the two
official scripts differ, each version keeps its own rule:

- normalisation (both): lowercase, drop ASCII punctuation (`string.punctuation`), drop the whole words
  a/an/the, collapse whitespace. Unicode punctuation (curly quotes, dashes) is kept.
- v1.1: EM and F1 take the max over every gold answer; F1 is 0 when no token is shared, even when both
  sides normalise to nothing. A question without a prediction scores 0 and still counts in the total.
- v2.0: gold answers that normalise to "" are dropped, and a question left with none has the single gold
  answer "" (unanswerable); F1 against an empty side is 1 if both are empty, else 0. A no-answer
  probability above the threshold turns a prediction into "no answer"; `best_*` sweep that threshold.
- Sums run left to right in dataset order (v1.1 adds in a loop; v2.0 calls `sum()` and the official
  numbers are those of the plain, uncompensated float addition), so the floats match bit for bit.

The official v2.0 script crashes (KeyError) when a question has no prediction; here such a question
scores 0 in every total, as under v1.1. Questions of the dataset are the denominators; predictions for
ids not in the dataset are ignored.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from realtime_qa.qacore.errors import InvalidInputError
from realtime_qa.qacore.squad import METRIC_VERSIONS, SquadDataset

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
DEFAULT_NA_PROB_THRESH = 1.0


def normalize_answer(text: str) -> str:
    """Lowercase, strip ASCII punctuation, remove the words a/an/the, collapse whitespace (in that order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> int:
    """1 when both normalise to the same string (two empty strings match), else 0. Same in v1.1 and v2.0."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_v1(prediction: str, gold: str) -> float:
    """Token F1 of the v1.1 script: 0 when nothing is shared (so also 0 when both sides are empty)."""
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    return _token_f1(prediction_tokens, gold_tokens)


def f1_v2(prediction: str, gold: str) -> float:
    """Token F1 of the v2.0 script: when either side has no tokens, 1 if both have none, else 0."""
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not prediction_tokens or not gold_tokens:
        return int(prediction_tokens == gold_tokens)
    return _token_f1(prediction_tokens, gold_tokens)


def _token_f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    num_same = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def gold_answers_v2(answer_texts: Iterable[str]) -> list[str]:
    """The v2.0 gold set: answers that normalise to something, or [""] when none does (unanswerable)."""
    kept = [text for text in answer_texts if normalize_answer(text)]
    return kept or [""]


@dataclass(frozen=True)
class SquadScores:
    """What the official script prints (`values`, in its key order) plus the ids it warned about."""

    version: str  # "1.1" | "2.0"
    values: dict[str, float | int]
    missing_predictions: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """Formatted as the official script prints it: one line for v1.1, indent=2 for v2.0."""
        return json.dumps(self.values) if self.version == "1.1" else json.dumps(self.values, indent=2)

    def __getitem__(self, key: str) -> float | int:
        return self.values[key]


def evaluate(
    dataset: SquadDataset,
    predictions: Mapping[str, str],
    version: str | None = None,
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = DEFAULT_NA_PROB_THRESH,
) -> SquadScores:
    """Score `predictions` under `version` ("1.1" or "2.0"; by default the dataset's own version)."""
    version = version or dataset.metric_version
    if version not in METRIC_VERSIONS:
        raise InvalidInputError(
            f"cannot tell the SQuAD version of {dataset.source} (version field {dataset.version!r}); "
            "choose 1.1 or 2.0 explicitly"
        )
    if version == "1.1":
        if na_probs is not None:
            raise InvalidInputError("a no-answer probability file applies to SQuAD 2.0 scoring only")
        return evaluate_v1(dataset, predictions)
    return evaluate_v2(dataset, predictions, na_probs, na_prob_thresh)


def evaluate_v1(dataset: SquadDataset, predictions: Mapping[str, str]) -> SquadScores:
    """exact_match and f1 (x100) over every question of the dataset; unanswered questions score 0."""
    exact_total: int = 0
    f1_total: float = 0
    count = 0
    missing: list[str] = []
    for _, question in dataset.questions():
        count += 1
        if question.id not in predictions:
            missing.append(question.id)
            continue
        golds = question.answer_texts
        if not golds:
            raise InvalidInputError(
                f"question {question.id} of {dataset.source} has no gold answer, which SQuAD 1.1 scoring "
                "cannot score (SQuAD 2.0 data: score it as version 2.0)"
            )
        prediction = predictions[question.id]
        exact_total += max(exact_match(prediction, gold) for gold in golds)
        f1_total += max(f1_v1(prediction, gold) for gold in golds)
    if count == 0:
        raise InvalidInputError(f"{dataset.source} has no questions to score")
    return SquadScores("1.1", {"exact_match": 100.0 * exact_total / count, "f1": 100.0 * f1_total / count}, missing)


def evaluate_v2(
    dataset: SquadDataset,
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = DEFAULT_NA_PROB_THRESH,
) -> SquadScores:
    """exact, f1, total, HasAns_*/NoAns_* (x100); with `na_probs` also best_exact/best_f1 and their thresholds."""
    has_answer: dict[str, bool] = {}
    exact_raw: dict[str, float] = {}
    f1_raw: dict[str, float] = {}
    missing: list[str] = []
    for _, question in dataset.questions():
        has_answer[question.id] = question.has_answer
        if question.id not in predictions:
            missing.append(question.id)
            continue
        golds = gold_answers_v2(question.answer_texts)
        prediction = predictions[question.id]
        exact_raw[question.id] = max(exact_match(prediction, gold) for gold in golds)
        f1_raw[question.id] = max(f1_v2(prediction, gold) for gold in golds)
    if not has_answer:
        raise InvalidInputError(f"{dataset.source} has no questions to score")
    # Without a file every prediction has no-answer probability 0.0, as in the official script.
    probabilities = na_probs if na_probs is not None else dict.fromkeys(predictions, 0.0)
    unlisted = [qid for qid in exact_raw if qid not in probabilities]
    if unlisted:
        raise InvalidInputError(
            f"the no-answer probability file lacks {len(unlisted)} answered question(s), e.g. {unlisted[0]}"
        )
    exact_scores = _apply_na_threshold(exact_raw, probabilities, has_answer, na_prob_thresh)
    f1_scores = _apply_na_threshold(f1_raw, probabilities, has_answer, na_prob_thresh)
    values: dict[str, float | int] = _eval_block(exact_scores, f1_scores, list(has_answer))
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [qid for qid, answerable in has_answer.items() if answerable is wanted]
        if qids:
            for key, value in _eval_block(exact_scores, f1_scores, qids).items():
                values[f"{prefix}_{key}"] = value
    if na_probs is not None:
        for name, raw in (("exact", exact_raw), ("f1", f1_raw)):
            best, thresh = _best_threshold(predictions, raw, na_probs, has_answer)
            values[f"best_{name}"] = best
            values[f"best_{name}_thresh"] = thresh
    return SquadScores("2.0", values, missing)


def _apply_na_threshold(
    scores: dict[str, float], na_probs: Mapping[str, float], has_answer: dict[str, bool], thresh: float
) -> dict[str, float]:
    """Predictions whose no-answer probability exceeds `thresh` become "no answer": right iff unanswerable."""
    return {qid: float(not has_answer[qid]) if na_probs[qid] > thresh else score for qid, score in scores.items()}


def _eval_block(exact_scores: dict[str, float], f1_scores: dict[str, float], qids: list[str]) -> dict[str, float | int]:
    # A question without a prediction adds 0 but counts in the total.
    total = len(qids)
    return {
        "exact": 100.0 * _plain_sum(exact_scores.get(qid, 0) for qid in qids) / total,
        "f1": 100.0 * _plain_sum(f1_scores.get(qid, 0) for qid in qids) / total,
        "total": total,
    }


def _best_threshold(
    predictions: Mapping[str, str],
    scores: dict[str, float],
    na_probs: Mapping[str, float],
    has_answer: dict[str, bool],
) -> tuple[float, float]:
    """The best score over no-answer thresholds, and the threshold (a na_prob value, or 0.0) that reaches it.

    Starting from "every question abstains" (each answered unanswerable question right), questions are
    switched to their prediction in rising na_prob order (ties in na-prob file order, as Python's stable
    sort leaves them); the running score's first maximum wins. Unanswered questions never gain.
    """
    current: float = sum(1 for qid, answerable in has_answer.items() if not answerable and qid in scores)
    best = current
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            current += scores[qid]
        elif predictions[qid]:
            current -= 1  # an unanswerable question answered with text loses its point
        if current > best:
            best = current
            best_thresh = na_probs[qid]
    return 100.0 * best / len(has_answer), best_thresh


def _plain_sum(values: Iterable[float]) -> float:
    """Left-to-right float addition (Python < 3.12 `sum`), independent of the interpreter's `sum` algorithm."""
    total: float = 0
    for value in values:
        total += value
    return total
