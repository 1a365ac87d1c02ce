"""The canonical in-memory checkpoint every reader produces and every exporter reads.

Its own module so that readers (`builder.checkpoint`) and writers (`builder.onnx_graph`) both depend
on it without depending on each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from realtime_qa.qacore.confidence import ConfidenceCalibration
from realtime_qa.qacore.config import ModelConfig

QA_HEAD = ("qa_outputs.weight", "qa_outputs.bias")


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A BERT QA model in canonical form; weight names are those of HF `BertForQuestionAnswering`."""

    config: ModelConfig
    weights: dict[str, np.ndarray]  # float32
    tokenizer_dir: Path  # holds tokenizer.json and/or vocab.txt
    source_sha256: str
    model_id: str
    model_dir: Path | None = None  # where the checkpoint's files are (its model card, if any)
    # config.json `qa_null_threshold`: the calibrated abstention threshold the engine carries to its decoder
    null_threshold: float | None = None
    # config.json `qa_confidence_calibration`: the Platt scaling of the returned confidence, carried likewise
    confidence_calibration: ConfidenceCalibration | None = None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a BERT QA network of `config` has, by canonical name, with its shape."""
    hidden, inner = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "bert.embeddings.word_embeddings.weight": (config.vocab_size, hidden),
        "bert.embeddings.position_embeddings.weight": (config.max_position_embeddings, hidden),
        "bert.embeddings.token_type_embeddings.weight": (config.type_vocab_size, hidden),
        "bert.embeddings.LayerNorm.weight": (hidden,),
        "bert.embeddings.LayerNorm.bias": (hidden,),
    }
    for index in range(config.num_hidden_layers):
        layer = f"bert.encoder.layer.{index}"
        for dense, out_features, in_features in (
            ("attention.self.query", hidden, hidden),
            ("attention.self.key", hidden, hidden),
            ("attention.self.value", hidden, hidden),
            ("attention.output.dense", hidden, hidden),
            ("intermediate.dense", inner, hidden),
            ("output.dense", hidden, inner),
        ):
            shapes[f"{layer}.{dense}.weight"] = (out_features, in_features)
            shapes[f"{layer}.{dense}.bias"] = (out_features,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{layer}.{norm}.weight"] = (hidden,)
            shapes[f"{layer}.{norm}.bias"] = (hidden,)
    shapes["qa_outputs.weight"] = (2, hidden)
    shapes["qa_outputs.bias"] = (2,)
    return shapes
