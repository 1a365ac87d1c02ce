"""Span decoding: engine logits over windows become answers with character offsets.

The answer text is always a slice of the original passage (never detokenized text), each n-best span's
score is a probability (softmax over the n-best spans, and the null answer where abstaining is allowed), and
the null answer of SQuAD 2.0 wins when its score beats the best span by more than a threshold.

The returned answer's score is its confidence (`Prediction.confidence`): where abstaining is allowed, the
threshold-shifted probability of what is returned, through the model's calibration (`qacore.confidence`), so
`best.score` may differ from `nbest[0].score` there; without abstaining, the best span's n-best probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from realtime_qa.qacore.confidence import ConfidenceCalibration, returned_confidence
from realtime_qa.qacore.engine import Engine, EngineSpans
from realtime_qa.qacore.errors import EngineFaultError, InvalidInputError
from realtime_qa.qacore.features import Features, Window

MAX_N_BEST = 100
MAX_ANSWER_TOKENS = 512


@dataclass(frozen=True)
class DecoderConfig:
    """How spans are searched and when the model abstains."""

    n_best_size: int = 20
    max_answer_length: int = 30
    allow_null: bool = False  # SQuAD 2.0: the model may answer "no answer"
    null_threshold: float = 0.0  # abstain when null score - best span score > this (in logits)
    # The model's Platt scaling of the returned confidence (engine meta.json); used only where abstaining is
    # allowed. None: the confidence is the threshold-shifted probability.
    calibration: ConfidenceCalibration | None = None

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
    """One candidate answer: `text == passage[start:end]`, offsets in Unicode code points."""

    text: str
    start: int
    end: int
    # In `Prediction.nbest`: probability among the n-best (and the null answer, where allowed). In
    # `Prediction.best`: the answer's confidence (`Prediction.confidence`).
    score: float
    logit: float  # start logit + end logit


@dataclass(frozen=True)
class Prediction:
    """The decoded answer to one question: the best span, or an abstention, and the n-best list."""

    best: Span | None  # None when the model abstains
    nbest: list[Span] = field(default_factory=list)
    null_logit: float = float("-inf")  # [CLS] start + end logit, minimised over windows
    null_probability: float = 0.0  # the null answer's probability among the n-best (0 unless abstaining is allowed)
    # How sure the model is of what it returns (the best span, or the abstention). Where abstaining is allowed:
    # `qacore.confidence.returned_confidence` (threshold-shifted, then calibrated when the model ships a
    # calibration). Otherwise: the best span's probability among the n-best spans (not calibrated; 0 if none).
    confidence: float = 0.0

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
    """Decode one question from the logits of its windows (rows in `features.windows` order).

    Columns past a window's length are ignored (they may be padding or -inf). Raises `EngineFaultError`
    when a window's logits are not all finite: that is a broken engine, never an answer or an abstention.
    """
    config = config or DecoderConfig()
    if start_logits.shape[0] != len(features.windows) or end_logits.shape != start_logits.shape:
        raise InvalidInputError("logits do not match the question's windows")
    if start_logits.ndim != 2 or start_logits.shape[1] < max(window.seq_len for window in features.windows):
        raise InvalidInputError("logits are narrower than the question's windows")
    _check_finite(features, start_logits, end_logits)
    candidates, null_logit = _candidates(features, start_logits, end_logits, config)
    return _prediction(features, candidates, null_logit, config)


def _prediction(
    features: Features, candidates: list[tuple[int, int, float]], null_logit: float, config: DecoderConfig
) -> Prediction:
    """The prediction from the best spans (char start, char end, logit; best first) and the null logit."""
    ranked = candidates[: config.n_best_size]
    logits = np.array([logit for _, _, logit in ranked] + ([null_logit] if config.allow_null else []))
    probabilities = (_softmax(logits) if logits.size else logits).tolist()  # Python floats, converted at once
    text = features.passage.text
    nbest = [
        new_span(text[start:end], start, end, probability, logit)
        for (start, end, logit), probability in zip(ranked, probabilities, strict=False)
    ]
    null_probability = probabilities[-1] if config.allow_null and probabilities else 0.0
    best: Span | None = nbest[0] if nbest else None
    confidence = best.score if best is not None else 0.0
    if config.allow_null:
        abstains = best is None or null_logit - best.logit > config.null_threshold
        span_probability = best.score if best is not None else 0.0
        confidence = returned_confidence(
            span_probability, null_probability, abstains, config.null_threshold, config.calibration
        )
        best = None if abstains or best is None else replace(best, score=confidence)
    return Prediction(best, nbest, null_logit, null_probability, confidence)


_new_object = object.__new__


def new_span(text: str, start: int, end: int, score: float, logit: float) -> Span:
    """`Span(text, start, end, score, logit)` for the n-best lists (here and in the client's reply conversion): a
    frozen dataclass's `__init__` sets each field through `object.__setattr__` (0.8 us a span, 4x a plain object's),
    and every answer builds 20."""
    span: Span = _new_object(Span)
    span.__dict__.update(text=text, start=start, end=end, score=score, logit=logit)
    return span


def span_masks(windows: Sequence[Window], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Where answers may start and end in a padded batch of windows (bool [windows, seq_len]), for an
    engine's device span search (`Engine.infer_spans`): the same rule `decode` applies to logits."""
    may_start = np.zeros((len(windows), seq_len), bool)
    may_end = np.zeros((len(windows), seq_len), bool)
    for row, window in enumerate(windows):
        context = slice(window.context_offset, window.context_offset + window.length)
        may_start[row, context] = window.max_context
        may_end[row, context] = True
    return may_start, may_end


def uses_device_spans(engine: Engine, config: DecoderConfig) -> bool:
    """Whether `engine` searches spans for `config` on the device (keeping twice the n-best, as `decode` does)."""
    limits = engine.span_search_limits()
    return limits is not None and 2 * config.n_best_size <= limits[0] and config.max_answer_length <= limits[1]


def decode_spans(features: Features, spans: EngineSpans, config: DecoderConfig | None = None) -> Prediction:
    """Decode one question from its windows' device span search (rows in `features.windows` order)."""
    config = config or DecoderConfig()
    if spans.starts.shape[0] != len(features.windows):
        raise InvalidInputError("spans do not match the question's windows")
    if not (np.isfinite(spans.null_logits).all() and not np.isnan(spans.logits).any()):
        raise EngineFaultError("the engine returned NaN or infinite logits; its engine file may be corrupt")
    candidates = _device_candidates(features, spans, config.n_best_size)
    return _prediction(features, candidates, float(spans.null_logits.min()), config)


def _device_candidates(features: Features, spans: EngineSpans, count: int) -> list[tuple[int, int, float]]:
    """The `count` best spans of the device search as (char start, char end, logit), best first (ties in window,
    then slot order), distinct by character span.

    Few numpy calls, each on the found slots of every window at once: a SQuAD question has 1-2 windows and 40
    slots each, so the cost is per call, not per element. Python ints and floats are converted at once (per-element
    numpy scalar conversions cost more than the loop)."""
    windows = features.windows
    if len(windows) == 1:  # most questions: one shift, no row index
        found = spans.starts[0] >= 0
        token_starts, token_ends, logits = spans.starts[0][found], spans.ends[0][found], spans.logits[0][found]
        shift: int | np.ndarray = windows[0].passage_start - windows[0].context_offset
    else:
        rows, slots = np.nonzero(spans.starts >= 0)
        token_starts, token_ends, logits = spans.starts[rows, slots], spans.ends[rows, slots], spans.logits[rows, slots]
        # Window position -> passage token: passage_start - context_offset of each span's window.
        shift = np.array([window.passage_start - window.context_offset for window in windows])[rows]
    offsets = features.passage.offsets
    char_starts = offsets[token_starts + shift, 0].tolist()
    char_ends = offsets[token_ends + shift, 1].tolist()
    values = logits.tolist()
    candidates: list[tuple[int, int, float]] = []
    seen: set[tuple[int, int]] = set()
    for index in np.argsort(-logits, kind="stable").tolist():
        span = (char_starts[index], char_ends[index])
        if span not in seen:
            seen.add(span)
            candidates.append((*span, values[index]))
            if len(candidates) == count:
                break
    return candidates


def _check_finite(features: Features, start_logits: np.ndarray, end_logits: np.ndarray) -> None:
    widths = np.array([window.seq_len for window in features.windows])
    used = np.arange(start_logits.shape[1])[None, :] < widths[:, None]
    if not (np.isfinite(start_logits[used]).all() and np.isfinite(end_logits[used]).all()):
        raise EngineFaultError("the engine returned NaN or infinite logits; its engine file may be corrupt")


# Windows decoded per numpy step: bounds the [windows, tokens, answer length] score block (~2.5 MB each).
WINDOWS_PER_STEP = 16


def _candidates(
    features: Features, start_logits: np.ndarray, end_logits: np.ndarray, config: DecoderConfig
) -> tuple[list[tuple[int, int, float]], float]:
    """The best valid spans as (char start, char end, logit), best first, distinct by character span, and
    the null logit ([CLS] start + end, minimised over windows).

    A span is valid when it starts in a window where its first token has its most context, ends in the
    same window at or after its start, and is at most `max_answer_length` tokens long. All valid spans
    are scored at once as a [window, start, length] block (no loop over pairs), and the top ones kept.
    """
    windows = features.windows
    null_logit = float(np.min(start_logits[:, 0].astype(np.float64) + end_logits[:, 0].astype(np.float64)))
    longest = max(window.length for window in windows)
    band = min(config.max_answer_length, longest)
    keep = config.n_best_size * 2  # a few more than asked: distinct token spans may share a character span
    picked_rows: list[np.ndarray] = []
    picked_starts: list[np.ndarray] = []
    picked_lengths: list[np.ndarray] = []
    picked_logits: list[np.ndarray] = []
    for first in range(0, len(windows), WINDOWS_PER_STEP):
        group = windows[first : first + WINDOWS_PER_STEP]
        starts = np.full((len(group), longest), -np.inf, np.float32)
        ends = np.full((len(group), longest + band), -np.inf, np.float32)
        for row, window in enumerate(group):
            context = slice(window.context_offset, window.context_offset + window.length)
            starts[row, : window.length] = np.where(window.max_context, start_logits[first + row, context], -np.inf)
            ends[row, : window.length] = end_logits[first + row, context]
        # scores[w, s, d] = start s + end s + d, for answers of d + 1 tokens
        scores = starts[:, :, None] + ends[:, np.arange(longest)[:, None] + np.arange(band)[None, :]]
        flat = scores.reshape(-1)
        count = min(keep, flat.size)
        top = np.argpartition(-flat, count - 1)[:count] if flat.size > count else np.arange(flat.size)
        top = top[np.isfinite(flat[top])]
        rows, token_starts, lengths = np.unravel_index(top, scores.shape)
        picked_rows.append(rows + first)
        picked_starts.append(token_starts)
        picked_lengths.append(lengths)
        picked_logits.append(flat[top])
    rows = np.concatenate(picked_rows)
    token_starts = np.concatenate(picked_starts)
    lengths = np.concatenate(picked_lengths)
    order = np.argsort(-np.concatenate(picked_logits), kind="stable")
    rows, token_starts, token_ends = rows[order], token_starts[order], token_starts[order] + lengths[order]
    # Every candidate's character span and float64 logit at once, then Python values (per-element numpy scalar
    # conversions in the loop cost more than the loop).
    passage_starts = np.array([window.passage_start for window in windows])[rows]
    context_offsets = np.array([window.context_offset for window in windows])[rows]
    offsets = features.passage.offsets
    char_starts = offsets[passage_starts + token_starts, 0].tolist()
    char_ends = offsets[passage_starts + token_ends, 1].tolist()
    logits = (
        start_logits[rows, context_offsets + token_starts].astype(np.float64)
        + end_logits[rows, context_offsets + token_ends].astype(np.float64)
    ).tolist()
    spans: list[tuple[int, int, float]] = []
    seen: set[tuple[int, int]] = set()
    for char_span, logit in zip(zip(char_starts, char_ends, strict=True), logits, strict=True):
        if char_span in seen:
            continue
        seen.add(char_span)
        spans.append((*char_span, logit))
        if len(spans) == config.n_best_size:
            break
    spans.sort(key=lambda span: span[2], reverse=True)
    return spans, null_logit


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return np.asarray(shifted / shifted.sum())
