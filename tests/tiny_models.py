"""The tiny TensorFlow BERT checkpoint under tests/data, and engines built from it with extra config keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

TF_TINY = Path(__file__).parent / "data" / "tf_bert_tiny"


def build_tiny_engine(tmp_path_factory: pytest.TempPathFactory, **config_keys: Any) -> Path:
    """A copy of the tiny model whose config also holds `config_keys` (e.g. `qa_null_threshold`), built as
    `qa-build` builds any model (ONNX Runtime fp32, sequence 32, batch 2)."""
    from realtime_qa.builder.build import BuildConfig, build_engine

    model = tmp_path_factory.mktemp("tiny-model")
    for path in TF_TINY.iterdir():
        shutil.copy(path, model / path.name)
    config = json.loads((model / "bert_config.json").read_text())
    (model / "bert_config.json").write_text(json.dumps({**config, **config_keys}))
    out = tmp_path_factory.mktemp("tiny-engine") / "engine"
    return build_engine(
        BuildConfig(checkpoint=model / "model.ckpt-3", output=out, sequence_lengths=(32,), batch_sizes=(2,))
    )
