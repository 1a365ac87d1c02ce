"""Question answering without a server: featurize -> engine -> decode, with per-stage timings.

Used by the demo CLI and the evaluator; the gRPC service opens one per engine (`from_engine_dir`),
reuses its `featurizer`, `engine` and `decoder_config`, and batches the windows of many requests itself.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qacore.decoding import DecoderConfig, Prediction, decode
from qacore.engine import Engine
from qacore.errors import EngineError, InvalidInputError
from qacore.factory import EngineOptions, load_engine
from qacore.features import EncodedPassage, Features, Featurizer, FeaturizerConfig, featurizer_config_for
from qacore.latency import LatencyTracker, StageTimings
from qacore.tokenization import load_tokenizer, vocab_sha256


@dataclass(frozen=True)
class AnswerResult:
    """One answered question: the decoded prediction and where its time went."""

    question: str
    prediction: Prediction
    timings: StageTimings


def featurizer_for_engine(engine: Engine, engine_dir: Path, config: FeaturizerConfig | None) -> Featurizer:
    """The featurizer of an engine directory: its own tokenizer, windows no longer than the engine takes."""
    tokenizer = load_tokenizer(engine_dir)
    if vocab_sha256(tokenizer) != engine.meta.vocab_sha256:
        raise EngineError(f"tokenizer in {engine_dir} does not match the vocabulary the engine was built with")
    config = config or featurizer_config_for(engine.meta.max_seq_length)
    if config.max_seq_length > engine.meta.max_seq_length:
        raise InvalidInputError(
            f"max sequence length {config.max_seq_length} exceeds the engine's {engine.meta.max_seq_length}"
        )
    return Featurizer(tokenizer, config)


class QuestionAnswerer:
    """Answers questions about passages with one engine, batching the windows of many questions."""

    def __init__(self, engine: Engine, featurizer: Featurizer, decoder_config: DecoderConfig | None = None) -> None:
        self.engine = engine
        self.featurizer = featurizer
        self.decoder_config = decoder_config or DecoderConfig()

    @classmethod
    def from_engine_dir(
        cls,
        engine_dir: Path,
        featurizer_config: FeaturizerConfig | None = None,
        decoder_config: DecoderConfig | None = None,
        engine_options: EngineOptions | None = None,
    ) -> QuestionAnswerer:
        engine = load_engine(Path(engine_dir), engine_options)
        try:
            featurizer = featurizer_for_engine(engine, Path(engine_dir), featurizer_config)
        except Exception:
            engine.close()
            raise
        return cls(engine, featurizer, decoder_config)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> QuestionAnswerer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode_passage(self, passage: str) -> EncodedPassage:
        return self.featurizer.encode_passage(passage)

    def answer(self, question: str, passage: str | EncodedPassage) -> AnswerResult:
        return self.answer_many([(question, passage)])[0]

    def answer_many(self, items: Sequence[tuple[str, str | EncodedPassage]]) -> list[AnswerResult]:
        """Answer many (question, passage) pairs; windows of all of them share engine batches.

        Each question's `infer_ns` counts the engine calls that carried any of its windows, so its
        timings say how long it waited on the engine, not a share of the batch.
        """
        trackers: list[LatencyTracker] = []
        features: list[Features] = []
        for question, passage in items:
            tracker = LatencyTracker()
            with tracker.stage("tokenize"):
                features.append(self.featurizer.featurize(question, passage))
            trackers.append(tracker)
        owners = [(item, row) for item, feature in enumerate(features) for row in range(len(feature.windows))]
        windows = [features[item].windows[row] for item, row in owners]
        # Sorting by length keeps windows of similar length in one batch, so little is padding.
        order = sorted(range(len(windows)), key=lambda index: windows[index].seq_len)
        starts = [np.zeros((len(f.windows), max(w.seq_len for w in f.windows)), np.float32) for f in features]
        ends = [np.zeros_like(start) for start in starts]
        max_batch = self.engine.meta.max_batch_size
        for first in range(0, len(order), max_batch):
            chunk = order[first : first + max_batch]
            batch = self.featurizer.batch([windows[index] for index in chunk])
            begin = time.perf_counter_ns()
            outputs = self.engine.infer(batch)
            duration = time.perf_counter_ns() - begin
            for position, index in enumerate(chunk):
                item, row = owners[index]
                width = windows[index].seq_len
                starts[item][row, :width] = outputs.start_logits[position, :width]
                ends[item][row, :width] = outputs.end_logits[position, :width]
            for item in {owners[index][0] for index in chunk}:
                trackers[item].add("infer", duration)
        results = []
        for tracker, feature, start, end, (question, _) in zip(trackers, features, starts, ends, items, strict=True):
            with tracker.stage("decode"):
                prediction = decode(feature, start, end, self.decoder_config)
            results.append(AnswerResult(question, prediction, tracker.finish()))
        return results

    def with_decoder(self, **changes: object) -> QuestionAnswerer:
        """The same engine and featurizer with other decoding options (n-best size, null threshold...)."""
        return QuestionAnswerer(self.engine, self.featurizer, replace(self.decoder_config, **changes))  # type: ignore[arg-type]
