"""Question answering without a server: featurize -> engine -> decode, with per-stage timings.

Used by the demo CLI and the evaluator. Engines are opened as an `EngineBundle` (engine, featurizer,
decoder defaults); windows are batched with `qacore.batching` and run and decoded with `qacore.window_results`,
the same path the gRPC service's batcher takes, so `qa-eval` scores what is served.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from realtime_qa.qacore.batching import plan_batches
from realtime_qa.qacore.bundle import EngineBundle, featurizer_for_engine, open_bundle
from realtime_qa.qacore.decoding import DecoderConfig, Prediction
from realtime_qa.qacore.engine import Engine
from realtime_qa.qacore.factory import EngineOptions
from realtime_qa.qacore.features import EncodedPassage, Features, Featurizer, FeaturizerConfig
from realtime_qa.qacore.latency import LatencyTracker, StageTimings
from realtime_qa.qacore.window_results import (
    decode_results,
    infer_batch,
    results_table,
    scatter_results,
    span_search_length,
)

__all__ = ["AnswerResult", "QuestionAnswerer", "featurizer_for_engine"]


@dataclass(frozen=True)
class AnswerResult:
    """One answered question: the decoded prediction and where its time went."""

    question: str
    prediction: Prediction
    timings: StageTimings


class QuestionAnswerer:
    """Answers questions about passages with one engine, batching the windows of many questions."""

    def __init__(self, engine: Engine, featurizer: Featurizer, decoder_config: DecoderConfig | None = None) -> None:
        self.engine = engine
        self.featurizer = featurizer
        self.decoder_config = decoder_config or DecoderConfig()

    @classmethod
    def from_bundle(cls, bundle: EngineBundle, decoder_config: DecoderConfig | None = None) -> QuestionAnswerer:
        """Answer with an opened bundle; `decoder_config` replaces the bundle's decoder defaults."""
        return cls(bundle.engine, bundle.featurizer, decoder_config or bundle.decoder_defaults)

    @classmethod
    def from_engine_dir(
        cls,
        engine_dir: Path,
        featurizer_config: FeaturizerConfig | None = None,
        decoder_config: DecoderConfig | None = None,
        engine_options: EngineOptions | None = None,
    ) -> QuestionAnswerer:
        return cls.from_bundle(open_bundle(Path(engine_dir), engine_options, featurizer_config), decoder_config)

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
        # One engine call per planned batch and one decode per question, as the service's batcher does them
        # (`qacore.window_results`): device span search where the engine offers it, logits otherwise.
        span_length = span_search_length(self.engine, self.decoder_config)
        limits = self.engine.span_search_limits()
        kept = limits[0] if limits is not None else 0
        tables = [results_table(feature.windows, span_length, kept) for feature in features]
        pad_id = self.featurizer.special.pad_id
        for chunk in plan_batches([window.seq_len for window in windows], self.engine.meta.max_batch_size):
            begin = time.perf_counter_ns()
            result, _ = infer_batch(self.engine, [windows[index] for index in chunk], pad_id, span_length)
            duration = time.perf_counter_ns() - begin
            for position, index in enumerate(chunk):
                item, row = owners[index]
                scatter_results(tables[item], [row], [windows[index].seq_len], result, [position])
            for item in {owners[index][0] for index in chunk}:
                trackers[item].add("infer", duration)
        results: list[AnswerResult] = []
        for tracker, feature, table, (question, _) in zip(trackers, features, tables, items, strict=True):
            with tracker.stage("decode"):
                prediction = decode_results(feature, table, self.decoder_config)
            results.append(AnswerResult(question, prediction, tracker.finish()))
        return results

    def with_decoder(self, **changes: object) -> QuestionAnswerer:
        """The same engine and featurizer with other decoding options (n-best size, null threshold...)."""
        return QuestionAnswerer(self.engine, self.featurizer, replace(self.decoder_config, **changes))  # type: ignore[arg-type]
