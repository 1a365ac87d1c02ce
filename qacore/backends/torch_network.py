"""The BERT QA network in PyTorch, defined once for training and the PyTorch CUDA engine.

Parameter names equal Hugging Face's `BertForQuestionAnswering`, so a state dict in the canonical
in-memory form (`builder.checkpoint.Checkpoint.weights`) loads as it is. Attention uses
`scaled_dot_product_attention`, which picks fused flash / memory-efficient kernels on GPUs.
Importing this module imports torch: only training and GPU backends do.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from realtime_qa.qacore.config import ModelConfig
from torch import nn


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    return nn.GELU(approximate="none" if name == "gelu" else "tanh")


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        summed = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings(segment_ids)
        )
        return self.LayerNorm(summed)


class Dense(nn.Module):
    """A linear layer with an optional LayerNorm over (output + residual), named as in HF."""

    def __init__(self, in_features: int, out_features: int, eps: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)
        self.LayerNorm = nn.LayerNorm(out_features, eps=eps) if eps is not None else None
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = self.dense(x)
        if self.LayerNorm is not None:
            y = self.LayerNorm(self.drop(y) + residual if residual is not None else self.drop(y))
        return y


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, dropout: float) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            split(self.query(x)),
            split(self.key(x)),
            split(self.value(x)),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return context.transpose(1, 2).reshape(batch, seq, hidden)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, dropout: float) -> None:
        super().__init__()
        self.self = SelfAttention(config, dropout)
        self.output = Dense(config.hidden_size, config.hidden_size, config.layer_norm_eps, dropout)


class Layer(nn.Module):
    def __init__(self, config: ModelConfig, dropout: float) -> None:
        super().__init__()
        self.attention = Attention(config, dropout)
        self.intermediate = Dense(config.hidden_size, config.intermediate_size)
        self.output = Dense(config.intermediate_size, config.hidden_size, config.layer_norm_eps, dropout)
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention.output(self.attention.self(x, mask), residual=x)
        return self.output(self.act(self.intermediate(attended)), residual=attended)


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig, dropout: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(config, dropout) for _ in range(config.num_hidden_layers))


class Bert(nn.Module):
    def __init__(self, config: ModelConfig, dropout: float) -> None:
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config, dropout)
        self.drop = nn.Dropout(dropout)


class BertForQA(nn.Module):
    """BERT encoder + span head: (input_ids, segment_ids, input_mask) -> (start_logits, end_logits)."""

    def __init__(self, config: ModelConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = config
        self.bert = Bert(config, dropout)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(
        self, input_ids: torch.Tensor, segment_ids: torch.Tensor, input_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.bert.drop(self.bert.embeddings(input_ids, segment_ids))
        # Additive mask broadcast over heads and query positions: padded keys get -inf-like weight.
        mask = ((1.0 - input_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min).to(x.dtype)
        for layer in self.bert.encoder.layer:
            x = layer(x, mask)
        logits = self.qa_outputs(x).float()
        return logits[..., 0], logits[..., 1]

    def load_weights(self, weights: Mapping[str, np.ndarray], strict: bool = True) -> None:
        """Load canonical (HF-named) numpy weights; with strict, every parameter must be present."""
        state = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in weights.items()}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if strict and (missing or unexpected):
            raise KeyError(f"weights do not fit the network: missing {missing[:5]}, unexpected {unexpected[:5]}")
