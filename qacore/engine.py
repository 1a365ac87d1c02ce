"""The one engine interface every backend implements, and the metadata written beside each engine."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
from realtime_qa.qacore.confidence import CALIBRATION_KEY, ConfidenceCalibration
from realtime_qa.qacore.config import ModelConfig
from realtime_qa.qacore.errors import EngineError, EngineFaultError
from realtime_qa.qacore.features import EngineInputs

META_FILE = "meta.json"
META_FORMAT = 1
WARMUP_TOKEN_ID = 101  # [CLS] in BERT's uncased vocabulary (any valid id would do)


@dataclass(frozen=True)
class EngineOutputs:
    """Start and end logits, float32, shape [batch, seq] (the shape of the inputs)."""

    start_logits: np.ndarray
    end_logits: np.ndarray


@dataclass(frozen=True)
class EngineSpans:
    """Each window's best answer spans, searched on the device (`Engine.infer_spans`), best first.

    Token positions index the window, as logit columns do; a slot with no valid span left holds start =
    end = -1 and logit -inf.
    """

    starts: np.ndarray  # int32 [batch, k]
    ends: np.ndarray  # int32 [batch, k], inclusive
    logits: np.ndarray  # float32 [batch, k]: start logit + end logit
    null_logits: np.ndarray  # float32 [batch]: the [CLS] start + end logit


class PendingSpans(ABC):
    """A device span search started by `Engine.launch_spans`, still running on the device: poll `ready()` (it never
    waits), then take `result()` exactly once (it waits for the device if need be, and frees the engine for its next
    call, so a caller that gives up still calls it)."""

    @abstractmethod
    def ready(self) -> bool:
        """Whether `result()` would return without waiting for the device."""

    @abstractmethod
    def result(self) -> EngineSpans:
        """The spans, as `Engine.infer_spans` returns them."""


@dataclass(frozen=True)
class EngineMeta:
    """What a runtime must know about an engine before trusting it; stored as `meta.json`."""

    backend: str  # "onnxruntime" | "tensorrt" | "torch"
    precision: str  # "fp32" | "fp16" | "bf16" | "int8"
    model_id: str  # the model's name, e.g. "minilm-l6-squad"
    model_config: ModelConfig
    vocab_sha256: str
    source_sha256: str  # hash of the checkpoint the engine was built from
    engine_file: str  # file name inside the engine directory
    max_batch_size: int
    sequence_lengths: tuple[int, ...]  # allowed (or optimised-for) sequence lengths, ascending
    backend_version: str = ""
    builder_options: dict[str, Any] = field(default_factory=dict)
    model_card: str = ""  # one-paragraph summary of the model card
    # SHA-256 of `engine_file`, checked at load: a corrupted or swapped engine file is refused, not served.
    engine_sha256: str = ""
    # The model's calibrated abstention threshold (config.json `qa_null_threshold`): the decoder's default
    # null threshold wherever abstaining is allowed. None: 0.0.
    null_threshold: float | None = None
    # The model's Platt scaling of the returned confidence (config.json `qa_confidence_calibration`), applied
    # wherever abstaining is allowed (`qacore.confidence`). None: the confidence is the threshold-shifted probability.
    confidence_calibration: ConfidenceCalibration | None = None
    format: int = META_FORMAT

    @property
    def max_seq_length(self) -> int:
        return max(self.sequence_lengths)

    def to_json(self) -> str:
        raw = asdict(self)
        raw["sequence_lengths"] = list(self.sequence_lengths)
        return json.dumps(raw, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> EngineMeta:
        raw = json.loads(text)
        if raw.get("format") != META_FORMAT:
            raise EngineError(f"engine metadata format {raw.get('format')!r} is not {META_FORMAT}; rebuild the engine")
        raw["model_config"] = ModelConfig.from_dict(raw["model_config"])
        raw["sequence_lengths"] = tuple(raw["sequence_lengths"])
        if raw.get("confidence_calibration") is not None:
            try:
                raw["confidence_calibration"] = ConfidenceCalibration.from_dict(raw["confidence_calibration"])
            except ValueError as exc:
                raise EngineError(f"confidence_calibration ({CALIBRATION_KEY} of the model): {exc}") from None
        return cls(**raw)

    def write(self, engine_dir: Path) -> None:
        (engine_dir / META_FILE).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def read(cls, engine_dir: Path) -> EngineMeta:
        path = engine_dir / META_FILE
        if not path.is_file():
            raise EngineError(f"not an engine directory (no {META_FILE}): {engine_dir}")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise EngineError(f"unreadable engine metadata {path}: {exc}") from None


class Engine(ABC):
    """A compiled BERT QA network: token windows in, start/end logits out.

    `infer` is synchronous and not required to be thread-safe: callers (the batcher) run it on one
    executor thread per engine context, so the event loop never blocks on it.
    """

    def __init__(self, meta: EngineMeta) -> None:
        self.meta = meta

    @abstractmethod
    def infer(self, inputs: EngineInputs) -> EngineOutputs:
        """Run one padded batch; `inputs.batch_size <= meta.max_batch_size`."""

    def span_search_limits(self) -> tuple[int, int] | None:
        """(spans kept per window, longest answer in tokens) when the engine can search spans on the device
        (`infer_spans`); None (the default) when callers must decode the logits of `infer`."""
        return None

    def infer_spans(
        self, inputs: EngineInputs, may_start: np.ndarray, may_end: np.ndarray, max_answer_length: int
    ) -> EngineSpans:
        """The best spans of each window: start where `may_start`, end where `may_end` (bool [batch, seq]), at
        most `max_answer_length` tokens (<= the limit in `span_search_limits`). Optional capability."""
        raise EngineError(f"the {self.meta.backend} engine does not search spans on the device")

    def launches_spans(self) -> bool:
        """Whether `launch_spans` starts the span search without waiting for it (a GPU engine): a caller on an event
        loop can then poll for the result instead of blocking a thread on it. False (the default): call
        `infer_spans` on a thread."""
        return False

    def launch_spans(
        self, inputs: EngineInputs, may_start: np.ndarray, may_end: np.ndarray, max_answer_length: int
    ) -> PendingSpans:
        """`infer_spans` split in two: start it on the device (checks, copies and launches only) and return at once.
        Only where `launches_spans()`; one call in flight per engine (the next launch waits for the lock)."""
        raise EngineError(f"the {self.meta.backend} engine does not launch span searches without waiting")

    def warmup(self) -> None:
        """Run each optimised shape once so the first real request pays no start-up cost.

        Raises `EngineFaultError` when the engine answers with NaN or infinite logits, so a broken engine
        fails here, before it serves.
        """
        token = min(WARMUP_TOKEN_ID, self.meta.model_config.vocab_size - 1)
        for seq_len in self.meta.sequence_lengths:
            shape = (1, seq_len)
            outputs = self.infer(
                EngineInputs(np.full(shape, token, np.int32), np.zeros(shape, np.int32), np.ones(shape, np.int32))
            )
            if not (np.isfinite(outputs.start_logits).all() and np.isfinite(outputs.end_logits).all()):
                raise EngineFaultError(f"the engine returned NaN or infinite logits at warm-up (sequence {seq_len})")

    def close(self) -> None:  # noqa: B027 - backends without resources keep the default
        """Release memory and threads held by the engine."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_inputs(self, inputs: EngineInputs) -> None:
        """Refuse what no backend can run: mismatched or empty shapes, or more than the engine was built for."""
        shape = inputs.input_ids.shape
        if len(shape) != 2 or inputs.segment_ids.shape != shape or inputs.input_mask.shape != shape:
            raise EngineError(
                f"inputs must share one [batch, seq] shape, got input_ids {inputs.input_ids.shape}, "
                f"segment_ids {inputs.segment_ids.shape}, input_mask {inputs.input_mask.shape}"
            )
        if inputs.batch_size < 1 or inputs.seq_len < 1:
            raise EngineError(f"empty batch of shape {shape}")
        if inputs.batch_size > self.meta.max_batch_size:
            raise EngineError(f"batch of {inputs.batch_size} exceeds the engine's max {self.meta.max_batch_size}")
        if inputs.seq_len > self.meta.max_seq_length:
            raise EngineError(f"sequence of {inputs.seq_len} exceeds the engine's max {self.meta.max_seq_length}")
