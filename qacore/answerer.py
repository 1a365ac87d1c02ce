"""Question answering without a server: featurize -> engine -> decode, with per-stage timings.

Used by the demo CLI and the evaluator. Engines are opened as an `EngineBundle` (engine, featurizer,
decoder defaults) and windows are batched with `qacore.batching`, the same path the gRPC service's
batcher takes, so `qa-eval` scores the batching that is served.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from realtime_qa.qacore.batching import LogitsTable, pad_batch, plan_batches, scatter_rows
from realtime_qa.qacore.bundle import EngineBundle, featurizer_for_engine, open_bundle
from realtime_qa.qacore.decoding import DecoderConfig, Prediction, decode, decode_spans, span_masks, uses_device_spans
from realtime_qa.qacore.engine import Engine, EngineSpans
from realtime_qa.qacore.factory import EngineOptions
from realtime_qa.qacore.features import EncodedPassage, Features, Featurizer, FeaturizerConfig
from realtime_qa.qacore.latency import LatencyTracker, StageTimings

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
        tables = [LogitsTable.for_windows(feature.windows) for feature in features]
        pad_id = self.featurizer.special.pad_id
        # Engines that search spans on the device return a few spans per window instead of logit rows.
        device_spans = uses_device_spans(self.engine, self.decoder_config)
        spans: list[dict[int, EngineSpans]] = [{} for _ in features]  # per question: window row -> its spans
        for chunk in plan_batches([window.seq_len for window in windows], self.engine.meta.max_batch_size):
            batch = pad_batch([windows[index] for index in chunk], pad_id)
            begin = time.perf_counter_ns()
            if device_spans:
                masks = span_masks([windows[index] for index in chunk], batch.seq_len)
                found = self.engine.infer_spans(batch, *masks, self.decoder_config.max_answer_length)
                for position, index in enumerate(chunk):
                    item, row = owners[index]
                    spans[item][row] = _batch_row(found, position)
                for item in {owners[index][0] for index in chunk}:
                    trackers[item].add("infer", time.perf_counter_ns() - begin)
                continue
            outputs = self.engine.infer(batch)
            duration = time.perf_counter_ns() - begin
            for position, index in enumerate(chunk):
                item, row = owners[index]
                scatter_rows(
                    tables[item],
                    [row],
                    [windows[index].seq_len],
                    outputs.start_logits,
                    outputs.end_logits,
                    batch_rows=[position],
                )
            for item in {owners[index][0] for index in chunk}:
                trackers[item].add("infer", duration)
        results: list[AnswerResult] = []
        for tracker, feature, table, (question, _) in zip(trackers, features, tables, items, strict=True):
            with tracker.stage("decode"):
                if device_spans:
                    prediction = decode_spans(feature, _stack(spans[len(results)]), self.decoder_config)
                else:
                    prediction = decode(feature, table.start, table.end, self.decoder_config)
            results.append(AnswerResult(question, prediction, tracker.finish()))
        return results

    def with_decoder(self, **changes: object) -> QuestionAnswerer:
        """The same engine and featurizer with other decoding options (n-best size, null threshold...)."""
        return QuestionAnswerer(self.engine, self.featurizer, replace(self.decoder_config, **changes))  # type: ignore[arg-type]


def _batch_row(spans: EngineSpans, row: int) -> EngineSpans:
    """One window's spans out of a batch's device span search."""
    return EngineSpans(*(getattr(spans, name)[row : row + 1] for name in _SPAN_FIELDS))


def _stack(rows: dict[int, EngineSpans]) -> EngineSpans:
    """One question's spans in window order (batches carry windows shortest first)."""
    return EngineSpans(*(np.concatenate([getattr(rows[row], name) for row in sorted(rows)]) for name in _SPAN_FIELDS))


_SPAN_FIELDS = ("starts", "ends", "logits", "null_logits")
