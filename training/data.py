"""SQuAD v1.1 -> padded windows with start/end targets (training) or with their `Features` (evaluation).

There is no featurization here: questions and passages become windows through `qacore.features.Featurizer`,
answers become token targets through `char_span_to_token_span` and `answer_positions`, exactly as the
runtime cuts and reads them. This module only stacks the windows into arrays a trainer can keep on a GPU
and turns a model's window logits back into answer texts with `qacore.decoding.decode`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from realtime_qa.qacore.decoding import DecoderConfig, Prediction, decode
from realtime_qa.qacore.errors import InvalidInputError
from realtime_qa.qacore.features import (
    Features,
    Featurizer,
    FeaturizerConfig,
    Window,
    answer_positions,
    char_span_to_token_span,
)
from realtime_qa.qacore.squad import Article, SquadDataset, read_dataset
from realtime_qa.qacore.tokenization import load_tokenizer, vocab_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class WindowArrays:
    """Windows stacked and padded to one width. Segment ids and the attention mask follow from the lengths
    and context offsets (segment 1 runs from the first passage token to the final [SEP]), so they are not stored."""

    input_ids: np.ndarray  # (n, width) int32, padded with the tokenizer's [PAD] id
    lengths: np.ndarray  # (n,) int32: tokens before padding
    context_offsets: np.ndarray  # (n,) int32: position of the first passage token
    start_positions: np.ndarray  # (n,) int32: answer start, 0 ([CLS]) when the answer is not in the window
    end_positions: np.ndarray  # (n,) int32

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    def segment_ids(self) -> np.ndarray:
        positions = np.arange(self.width)[None, :]
        inside = positions < self.lengths[:, None]
        return ((positions >= self.context_offsets[:, None]) & inside).astype(np.int32)

    def input_mask(self) -> np.ndarray:
        return (np.arange(self.width)[None, :] < self.lengths[:, None]).astype(np.int32)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            input_ids=self.input_ids,
            lengths=self.lengths,
            context_offsets=self.context_offsets,
            start_positions=self.start_positions,
            end_positions=self.end_positions,
        )

    @classmethod
    def load(cls, path: Path) -> WindowArrays:
        with np.load(path) as arrays:
            return cls(**{name: arrays[name] for name in arrays.files})

    @classmethod
    def concatenate(cls, parts: Sequence[WindowArrays]) -> WindowArrays:
        return cls(
            input_ids=np.concatenate([part.input_ids for part in parts]),
            lengths=np.concatenate([part.lengths for part in parts]),
            context_offsets=np.concatenate([part.context_offsets for part in parts]),
            start_positions=np.concatenate([part.start_positions for part in parts]),
            end_positions=np.concatenate([part.end_positions for part in parts]),
        )


def stack_windows(
    windows: Sequence[Window], targets: Sequence[tuple[int, int]], width: int, pad_id: int
) -> WindowArrays:
    input_ids = np.full((len(windows), width), pad_id, dtype=np.int32)
    for row, window in enumerate(windows):
        input_ids[row, : window.seq_len] = window.input_ids
    target_array = np.asarray(targets, dtype=np.int32).reshape(-1, 2)
    return WindowArrays(
        input_ids=input_ids,
        lengths=np.asarray([window.seq_len for window in windows], dtype=np.int32),
        context_offsets=np.asarray([window.context_offset for window in windows], dtype=np.int32),
        start_positions=target_array[:, 0].copy(),
        end_positions=target_array[:, 1].copy(),
    )


@dataclass
class TrainStats:
    questions: int = 0
    windows: int = 0
    answer_not_in_tokens: int = 0  # the gold character span covers no passage token
    answer_in_no_window: int = 0  # no window holds the whole answer (every window targets [CLS])
    skipped_questions: int = 0  # questions the runtime refuses (InvalidInputError), left out

    def add(self, other: TrainStats) -> None:
        self.questions += other.questions
        self.windows += other.windows
        self.answer_not_in_tokens += other.answer_not_in_tokens
        self.answer_in_no_window += other.answer_in_no_window
        self.skipped_questions += other.skipped_questions


def train_windows(articles: Sequence[Article], featurizer: Featurizer) -> tuple[WindowArrays, TrainStats]:
    """Every window of every question, targeting its first gold answer ([CLS] where the window lacks it)."""
    windows: list[Window] = []
    targets: list[tuple[int, int]] = []
    stats = TrainStats()
    for article in articles:
        for paragraph in article.paragraphs:
            passage = featurizer.encode_passage(paragraph.context)
            for question in paragraph.questions:
                try:
                    features = featurizer.featurize(question.question, passage)
                except InvalidInputError:  # SQuAD train holds a few broken questions (one of 25,651 characters)
                    stats.skipped_questions += 1
                    continue
                answer = question.answers[0]
                span = char_span_to_token_span(passage, answer.answer_start, answer.answer_start + len(answer.text))
                stats.questions += 1
                stats.answer_not_in_tokens += span is None
                question_targets = [answer_positions(window, span) for window in features.windows]
                stats.answer_in_no_window += span is not None and all(t == (0, 0) for t in question_targets)
                windows.extend(features.windows)
                targets.extend(question_targets)
    stats.windows = len(windows)
    width = featurizer.config.max_seq_length
    return stack_windows(windows, targets, width, featurizer.special.pad_id), stats


def cached_train_windows(
    squad_path: Path, tokenizer_dir: Path, config: FeaturizerConfig, cache_dir: Path
) -> tuple[WindowArrays, TrainStats]:
    """`train_windows` over a whole SQuAD file (about 15 s for SQuAD v1.1 train on one core), kept in `cache_dir`
    under a key of the data, the vocabulary and the window settings."""
    tokenizer = load_tokenizer(tokenizer_dir)
    digest = hashlib.sha256(squad_path.read_bytes())
    digest.update(vocab_sha256(tokenizer).encode())
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    stem = f"train-{digest.hexdigest()[:16]}"
    arrays_path, stats_path = cache_dir / f"{stem}.npz", cache_dir / f"{stem}.json"
    if arrays_path.is_file() and stats_path.is_file():
        return WindowArrays.load(arrays_path), TrainStats(**json.loads(stats_path.read_text(encoding="utf-8")))
    windows, stats = train_windows(read_dataset(squad_path).articles, Featurizer(tokenizer, config))
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / f"{stem}.{os.getpid()}.partial.npz"
    windows.save(partial)
    partial.replace(arrays_path)  # atomic: runs started together never read a half-written file
    stats_path.write_text(json.dumps(asdict(stats)) + "\n", encoding="utf-8")
    log.info("featurized %s: %s", squad_path, stats)
    return windows, stats


@dataclass(frozen=True, eq=False)
class EvalSet:
    """The questions of a dataset, featurized for decoding, and all their windows in question order."""

    dataset: SquadDataset
    question_ids: list[str]
    features: list[Features]
    first_window: np.ndarray  # (questions + 1,): question i owns windows [first_window[i], first_window[i+1])
    windows: WindowArrays  # targets are unused (0)

    def __len__(self) -> int:
        return len(self.question_ids)


def build_eval_set(dataset: SquadDataset, featurizer: Featurizer) -> EvalSet:
    question_ids: list[str] = []
    features: list[Features] = []
    windows: list[Window] = []
    first = [0]
    for article in dataset.articles:
        for paragraph in article.paragraphs:
            passage = featurizer.encode_passage(paragraph.context)
            for question in paragraph.questions:
                feature = featurizer.featurize(question.question, passage)
                question_ids.append(question.id)
                features.append(feature)
                windows.extend(feature.windows)
                first.append(len(windows))
    arrays = stack_windows(
        windows, [(0, 0)] * len(windows), featurizer.config.max_seq_length, featurizer.special.pad_id
    )
    return EvalSet(dataset, question_ids, features, np.asarray(first, dtype=np.int64), arrays)


def predict(
    eval_set: EvalSet, start_logits: np.ndarray, end_logits: np.ndarray, config: DecoderConfig | None = None
) -> dict[str, Prediction]:
    """{question id: decoded prediction} from the logits of every window (rows in `eval_set.windows` order)."""
    if start_logits.shape[0] != len(eval_set.windows) or end_logits.shape != start_logits.shape:
        raise ValueError("logits do not match the evaluation windows")
    config = config or DecoderConfig()
    predictions = {}
    for index, (qid, feature) in enumerate(zip(eval_set.question_ids, eval_set.features, strict=True)):
        rows = slice(int(eval_set.first_window[index]), int(eval_set.first_window[index + 1]))
        predictions[qid] = decode(feature, start_logits[rows], end_logits[rows], config)
    return predictions


def predict_texts(
    eval_set: EvalSet, start_logits: np.ndarray, end_logits: np.ndarray, config: DecoderConfig | None = None
) -> dict[str, str]:
    """{question id: answer text} ("" where the decoder abstains)."""
    return {qid: prediction.text for qid, prediction in predict(eval_set, start_logits, end_logits, config).items()}
