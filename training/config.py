"""Typed hyper-parameters of one training run, read from a checked-in JSON file (training/configs/*.json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from realtime_qa.qacore.decoding import DecoderConfig
from realtime_qa.qacore.errors import InvalidInputError
from realtime_qa.qacore.features import FeaturizerConfig

MODELS = ("student", "teacher")
NEGATIVE_SOURCES = ("other_article", "same_article")
HARD_NEGATIVE_KINDS = ("sentence_removed", "entity_swap", "negation", "bm25_distractor")


@dataclass(frozen=True)
class TrainConfig:
    """One run: which network, how long, how fast, and (for a distilled student) how much to trust the teacher."""

    name: str
    model: str = "student"  # "student" (BertForQA) or "teacher" (MPNet)
    epochs: int = 3
    batch_size: int = 64
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.1  # linear warm-up over this share of all steps, then linear decay to 0
    weight_decay: float = 0.01  # not on biases and LayerNorm weights
    adam_eps: float = 1e-6
    max_grad_norm: float = 1.0
    dropout: float = 0.1
    seed: int = 42
    bf16: bool = True  # autocast matrix work to bfloat16; weights and optimizer state stay float32
    group_by_length: bool = True  # batches of similar window length (shuffled), so little compute is padding
    # Distillation: loss = alpha * CE(gold) + (1 - alpha) * T^2 * KL(teacher || student) at temperature T.
    distill_alpha: float = 1.0
    distill_temperature: float = 1.0
    # Synthetic unanswerable questions (`qa-train negatives`, training/negatives.py): this many per training
    # question, each paired with a paragraph from another article ("other_article") or its own ("same_article").
    negatives_per_question: float = 0.0
    negative_source: str = "other_article"
    # Harder negatives (`qa-train abstain`, training/negatives.py HARD_KINDS): which kinds of a prepared negatives
    # file to train on; empty = all of them. With distill_alpha < 1 and no `teacher` the teacher is the start model
    # itself (its logits on the positive windows; [CLS] on every negative window).
    negative_kinds: tuple[str, ...] = ()
    # `qa-train abstain` only: the name of the run whose exported model (`--teacher-dir RUN/model`) is the teacher;
    # its logits on the positive AND the negative windows are the soft targets (the null logit included).
    teacher: str = ""
    # Windows and decoding, as the runtime uses them.
    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30
    eval_batch_size: int = 256
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise InvalidInputError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise InvalidInputError("epochs, batch_size and learning_rate must be positive")
        if not 0.0 <= self.distill_alpha <= 1.0 or self.distill_temperature <= 0:
            raise InvalidInputError("distill_alpha must be in [0, 1] and distill_temperature positive")
        if not 0.0 <= self.negatives_per_question <= 1.0:
            raise InvalidInputError(f"negatives_per_question must be in [0, 1], got {self.negatives_per_question}")
        if self.negative_source not in NEGATIVE_SOURCES:
            raise InvalidInputError(f"negative_source must be one of {NEGATIVE_SOURCES}, got {self.negative_source!r}")
        object.__setattr__(self, "negative_kinds", tuple(self.negative_kinds))  # JSON gives a list
        unknown_kinds = sorted(set(self.negative_kinds) - set(HARD_NEGATIVE_KINDS))
        if unknown_kinds:
            raise InvalidInputError(f"negative_kinds must be among {HARD_NEGATIVE_KINDS}, got {unknown_kinds}")
        if self.teacher and not self.distills:
            raise InvalidInputError(f"teacher {self.teacher!r} needs distill_alpha < 1, got {self.distill_alpha}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise InvalidInputError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    @property
    def distills(self) -> bool:
        return self.distill_alpha < 1.0

    @property
    def featurizer(self) -> FeaturizerConfig:
        return FeaturizerConfig(self.max_seq_length, self.doc_stride, self.max_query_length)

    @property
    def decoder(self) -> DecoderConfig:
        return DecoderConfig(n_best_size=self.n_best_size, max_answer_length=self.max_answer_length)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InvalidInputError(f"unknown training config keys: {', '.join(unknown)}")
        return cls(**raw)

    @classmethod
    def from_file(cls, path: Path) -> TrainConfig:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidInputError(f"training config not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"training config {path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise InvalidInputError(f"training config {path} must hold a JSON object")
        return cls.from_dict(raw)
