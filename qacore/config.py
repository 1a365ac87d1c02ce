"""The BERT model configuration shared by the builder, the engines and training."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from realtime_qa.qacore.errors import CheckpointError


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a BERT encoder with a span-prediction (QA) head."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise CheckpointError(f"unsupported hidden_act {self.hidden_act!r}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face `config.json` or NVIDIA `bert_config.json` dict, ignoring unrelated keys."""
        known = {name: raw[name] for name in cls.__dataclass_fields__ if name in raw}
        missing = [name for name in ("hidden_size", "num_hidden_layers", "num_attention_heads") if name not in raw]
        if missing:
            raise CheckpointError(f"model config lacks {', '.join(missing)}")
        return cls(**known)

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"model config not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"model config {path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
