"""Featurization: questions and passages become the token windows a BERT QA engine reads.

One implementation serves the runtime, the gRPC service, evaluation and training. A passage is
tokenized once (`EncodedPassage`) and reused for every question asked about it. Long passages are
cut into overlapping windows (`doc_stride` tokens apart, as in Google's and NVIDIA's BERT samples),
and each passage token remembers the window in which it has the most context on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from realtime_qa.qacore.errors import InvalidInputError
from tokenizers import Tokenizer

# A documented bound on what one request may ask of the engines, in Unicode code points (what Python's
# len() counts; a JavaScript string's length counts UTF-16 units). 100,000 words of English are about
# 600,000 characters and 130,000 tokens (about 500 windows at the defaults): answered.
MAX_PASSAGE_CHARS = 1_000_000
MAX_QUESTION_CHARS = 4_096


@dataclass(frozen=True)
class FeaturizerConfig:
    """How questions and passages are cut into engine windows."""

    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64

    def __post_init__(self) -> None:
        if not 16 <= self.max_seq_length <= 4096:
            raise InvalidInputError(f"max_seq_length must be in [16, 4096], got {self.max_seq_length}")
        if not 1 <= self.max_query_length <= self.max_seq_length - 8:
            raise InvalidInputError(
                f"max_query_length must be in [1, max_seq_length - 8 = {self.max_seq_length - 8}], "
                f"got {self.max_query_length}"
            )
        if not 1 <= self.doc_stride <= self.max_seq_length - self.max_query_length - 3:
            raise InvalidInputError(
                f"doc_stride must be in [1, {self.max_seq_length - self.max_query_length - 3}] "
                f"(max_seq_length - max_query_length - 3), got {self.doc_stride}"
            )


def featurizer_config_for(max_seq_length: int) -> FeaturizerConfig:
    """The serving defaults (question <= 64 tokens, stride 128), shrunk to fit shorter engines."""
    defaults = FeaturizerConfig()
    length = min(defaults.max_seq_length, max_seq_length)
    query = min(defaults.max_query_length, length // 2)
    stride = min(defaults.doc_stride, length - query - 3)
    return FeaturizerConfig(max_seq_length=length, doc_stride=stride, max_query_length=query)


@dataclass(frozen=True)
class SpecialTokens:
    cls_id: int
    sep_id: int
    pad_id: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> SpecialTokens:
        ids = [tokenizer.token_to_id(token) for token in ("[CLS]", "[SEP]", "[PAD]")]
        if any(token_id is None for token_id in ids):
            raise InvalidInputError("tokenizer lacks one of [CLS], [SEP], [PAD]")
        cls_id, sep_id, pad_id = (int(token_id) for token_id in ids if token_id is not None)
        return cls(cls_id, sep_id, pad_id)


@dataclass(frozen=True, eq=False)
class EncodedPassage:
    """A passage tokenized once: token ids and each token's character span in `text`."""

    text: str
    token_ids: np.ndarray  # (n,) int32
    offsets: np.ndarray  # (n, 2) int32, [start, end) offsets into `text` in code points

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass(frozen=True, eq=False)
class Window:
    """One engine input row: [CLS] question [SEP] passage[start:start+length] [SEP], unpadded."""

    input_ids: np.ndarray  # (seq,) int32
    segment_ids: np.ndarray  # (seq,) int32
    context_offset: int  # position of the first passage token in the window
    passage_start: int  # index of that token in EncodedPassage.token_ids
    length: int  # number of passage tokens in the window
    max_context: np.ndarray  # (length,) bool: this window gives the token its most context

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True, eq=False)
class Features:
    """Everything decoding needs about one (question, passage) pair."""

    passage: EncodedPassage
    question_ids: np.ndarray
    windows: list[Window]


@dataclass(frozen=True, eq=False)
class EngineInputs:
    """A padded batch of windows, as every engine backend takes it (int32, shape [batch, seq])."""

    input_ids: np.ndarray
    segment_ids: np.ndarray
    input_mask: np.ndarray

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


class Featurizer:
    """Turns text into windows with one tokenizer and one `FeaturizerConfig`."""

    def __init__(self, tokenizer: Tokenizer, config: FeaturizerConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or FeaturizerConfig()
        self.special = SpecialTokens.of(tokenizer)

    def encode_passage(self, text: str) -> EncodedPassage:
        if not text or not text.strip():
            raise InvalidInputError("passage is empty")
        if len(text) > MAX_PASSAGE_CHARS:
            raise InvalidInputError(
                f"passage has {len(text):,} characters (Unicode code points); the limit is {MAX_PASSAGE_CHARS:,}"
            )
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if not encoding.ids:
            raise InvalidInputError("passage has no tokens")
        return EncodedPassage(
            text=text,
            token_ids=np.asarray(encoding.ids, dtype=np.int32),
            offsets=np.asarray(encoding.offsets, dtype=np.int32).reshape(-1, 2),
        )

    def encode_question(self, text: str) -> np.ndarray:
        if not text or not text.strip():
            raise InvalidInputError("question is empty")
        if len(text) > MAX_QUESTION_CHARS:
            raise InvalidInputError(
                f"question has {len(text):,} characters (Unicode code points); the limit is {MAX_QUESTION_CHARS:,}"
            )
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise InvalidInputError("question has no tokens")
        return np.asarray(ids[: self.config.max_query_length], dtype=np.int32)

    def featurize(self, question: str, passage: str | EncodedPassage) -> Features:
        encoded = passage if isinstance(passage, EncodedPassage) else self.encode_passage(passage)
        question_ids = self.encode_question(question)
        return Features(encoded, question_ids, self.windows(question_ids, encoded))

    def windows(self, question_ids: np.ndarray, passage: EncodedPassage) -> list[Window]:
        spans = window_spans(len(passage), self.config.max_seq_length - len(question_ids) - 3, self.config.doc_stride)
        best = max_context_windows(len(passage), spans)
        context_offset = len(question_ids) + 2
        windows = []
        for index, (start, length) in enumerate(spans):
            # Filled in place: one int32 array per window, no concatenation or cast (run per question).
            input_ids = np.empty(context_offset + length + 1, np.int32)
            input_ids[0] = self.special.cls_id
            input_ids[1 : context_offset - 1] = question_ids
            input_ids[context_offset - 1] = input_ids[-1] = self.special.sep_id
            input_ids[context_offset:-1] = passage.token_ids[start : start + length]
            segment_ids = np.zeros_like(input_ids)
            segment_ids[context_offset:] = 1
            windows.append(
                Window(
                    input_ids=input_ids,
                    segment_ids=segment_ids,
                    context_offset=context_offset,
                    passage_start=start,
                    length=length,
                    max_context=best[start : start + length] == index,
                )
            )
        return windows

    def batch(self, windows: list[Window], seq_len: int | None = None) -> EngineInputs:
        """Pad windows to the longest in the batch (or to `seq_len`, e.g. a fixed engine profile)."""
        return pad_windows(windows, self.special.pad_id, seq_len)


def window_spans(num_tokens: int, max_tokens_per_window: int, doc_stride: int) -> list[tuple[int, int]]:
    """(start, length) of each window over `num_tokens` passage tokens, `doc_stride` apart."""
    if max_tokens_per_window < 1:
        raise InvalidInputError("question leaves no room for the passage in a window")
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        length = min(num_tokens - start, max_tokens_per_window)
        spans.append((start, length))
        if start + length >= num_tokens:
            return spans
        start += min(length, doc_stride)


def max_context_windows(num_tokens: int, spans: list[tuple[int, int]]) -> np.ndarray:
    """For each passage token, the index of the window where it has the most context.

    The score of a token in a window is min(left context, right context) + 0.01 * window length;
    ties go to the earlier window (the rule of the original BERT SQuAD code).
    """
    if len(spans) == 1 and spans[0] == (0, num_tokens):  # one window holds the passage (most questions)
        return np.zeros(num_tokens, dtype=np.int32)
    best_window = np.full(num_tokens, -1, dtype=np.int32)
    best_score = np.full(num_tokens, -np.inf)
    for index, (start, length) in enumerate(spans):
        positions = np.arange(length)
        score = np.minimum(positions, length - 1 - positions) + 0.01 * length
        tokens = slice(start, start + length)
        better = score > best_score[tokens]
        best_score[tokens] = np.where(better, score, best_score[tokens])
        best_window[tokens] = np.where(better, index, best_window[tokens])
    return best_window


def pad_windows(windows: list[Window], pad_id: int, seq_len: int | None = None) -> EngineInputs:
    if not windows:
        raise InvalidInputError("no windows to batch")
    longest = max(window.seq_len for window in windows)
    width = seq_len if seq_len is not None else longest
    if width < longest:
        raise InvalidInputError(f"window of {longest} tokens does not fit sequence length {width}")
    input_ids = np.full((len(windows), width), pad_id, dtype=np.int32)
    segment_ids = np.zeros((len(windows), width), dtype=np.int32)
    input_mask = np.zeros((len(windows), width), dtype=np.int32)
    for row, window in enumerate(windows):
        input_ids[row, : window.seq_len] = window.input_ids
        segment_ids[row, : window.seq_len] = window.segment_ids
        input_mask[row, : window.seq_len] = 1
    return EngineInputs(input_ids, segment_ids, input_mask)


def char_span_to_token_span(passage: EncodedPassage, char_start: int, char_end: int) -> tuple[int, int] | None:
    """Passage token indices [first, last] covering characters [char_start, char_end), or None."""
    starts, ends = passage.offsets[:, 0], passage.offsets[:, 1]
    overlapping = np.nonzero((ends > char_start) & (starts < char_end))[0]
    if overlapping.size == 0:
        return None
    return int(overlapping[0]), int(overlapping[-1])


def answer_positions(window: Window, token_span: tuple[int, int] | None) -> tuple[int, int]:
    """Training targets in one window: the answer's (start, end) positions, or (0, 0) ([CLS]) if outside."""
    if token_span is None:
        return 0, 0
    first, last = token_span
    if first < window.passage_start or last >= window.passage_start + window.length:
        return 0, 0
    return first - window.passage_start + window.context_offset, last - window.passage_start + window.context_offset
