"""Span decoding: engine logits over windows become answers with character offsets.

The answer text is always a slice of the original passage (never detokenized text), the score is a
probability (softmax over the n-best spans, and the null answer where abstaining is allowed), and the
null answer of SQuAD 2.0 wins when its score beats the best span by more than a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qacore.errors import InvalidInputError
from qacore.features import Features

MAX_N_BEST = 100
MAX_ANSWER_TOKENS = 512


@dataclass(frozen=True)
class DecoderConfig:
    """How spans are searched and when the model abstains."""

    n_best_size: int = 20
    max_answer_length: int = 30
    allow_null: bool = False  # SQuAD 2.0: the model may answer "no answer"
    null_threshold: float = 0.0  # abstain when null score - best span score > this (in logits)

    def __post_init__(self) -> None:
        if not 1 <= self.n_best_size <= MAX_N_BEST:
            raise InvalidInputError(f"n_best_size must be in [1, {MAX_N_BEST}], got {self.n_best_size}")
        if not 1 <= self.max_answer_length <= MAX_ANSWER_TOKENS:
            raise InvalidInputError(
                f"max_answer_length must be in [1, {MAX_ANSWER_TOKENS}], got {self.max_answer_length}"
            )
        if not np.isfinite(self.null_threshold):
            raise InvalidInputError("null_threshold must be a finite number")


@dataclass(frozen=True)
class Span:
    """One candidate answer: `text == passage[start:end]`."""

    text: str
    start: int
    end: int
    score: float  # probability among the n-best (and the null answer, where allowed)
    logit: float  # start logit + end logit


@dataclass(frozen=True)
class Prediction:
    """The decoded answer to one question: the best span, or an abstention, and the n-best list."""

    best: Span | None  # None when the model abstains
    nbest: list[Span] = field(default_factory=list)
    null_logit: float = float("-inf")  # [CLS] start + end logit, minimised over windows
    null_probability: float = 0.0

    @property
    def abstained(self) -> bool:
        return self.best is None

    @property
    def text(self) -> str:
        return self.best.text if self.best is not None else ""


def decode(
    features: Features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    config: DecoderConfig | None = None,
) -> Prediction:
    """Decode one question from the logits of its windows (rows in `features.windows` order)."""
    config = config or DecoderConfig()
    if start_logits.shape[0] != len(features.windows) or end_logits.shape != start_logits.shape:
        raise InvalidInputError("logits do not match the question's windows")
    passage = features.passage
    candidates, null_logit = _candidates(
        features, start_logits, end_logits, config.n_best_size, config.max_answer_length
    )
    if not candidates:
        # No valid pair among the top starts and ends (say every top end precedes every top start): search
        # all pairs, so a question is never left without an answer it was not allowed to abstain from.
        widest = max(window.length for window in features.windows)
        candidates, _ = _candidates(features, start_logits, end_logits, widest, config.max_answer_length)
    ranked = sorted(candidates.items(), key=lambda item: item[1], reverse=True)[: config.n_best_size]
    logits = np.array([logit for _, logit in ranked] + ([null_logit] if config.allow_null else []))
    probabilities = _softmax(logits) if logits.size else logits
    nbest = [
        Span(passage.text[start:end], start, end, float(probabilities[i]), logit)
        for i, ((start, end), logit) in enumerate(ranked)
    ]
    null_probability = float(probabilities[-1]) if config.allow_null and logits.size else 0.0
    best: Span | None = nbest[0] if nbest else None
    if config.allow_null and (best is None or null_logit - best.logit > config.null_threshold):
        best = None
    return Prediction(best=best, nbest=nbest, null_logit=null_logit, null_probability=null_probability)


def _candidates(
    features: Features, start_logits: np.ndarray, end_logits: np.ndarray, top_k: int, max_answer_length: int
) -> tuple[dict[tuple[int, int], float], float]:
    """Valid spans among each window's `top_k` starts and ends, by character span with their best logit,
    and the null logit ([CLS] start + end, minimised over windows)."""
    passage = features.passage
    candidates: dict[tuple[int, int], float] = {}
    null_logit = float("inf")
    for row, window in enumerate(features.windows):
        first = window.context_offset
        starts = start_logits[row, first : first + window.length].astype(np.float64)
        ends = end_logits[row, first : first + window.length].astype(np.float64)
        null_logit = min(null_logit, float(start_logits[row, 0]) + float(end_logits[row, 0]))
        top_starts = _top_indices(np.where(window.max_context, starts, -np.inf), top_k)
        top_ends = _top_indices(ends, top_k)
        for s in top_starts:
            for e in top_ends:
                if e < s or e - s + 1 > max_answer_length:
                    continue
                char_span = (
                    int(passage.offsets[window.passage_start + s, 0]),
                    int(passage.offsets[window.passage_start + e, 1]),
                )
                logit = float(starts[s] + ends[e])
                if logit > candidates.get(char_span, -np.inf):
                    candidates[char_span] = logit
    return candidates, null_logit


def _top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest finite values, largest first."""
    candidates = np.argpartition(-values, k - 1)[:k] if values.size > k else np.arange(values.size)
    ordered = candidates[np.argsort(-values[candidates], kind="stable")]
    return ordered[np.isfinite(values[ordered])]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return np.asarray(shifted / shifted.sum())
