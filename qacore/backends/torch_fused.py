"""An inference-only BERT QA forward with fused stages, loaded from the same HF-named weights.

`qacore.backends.torch_network.BertForQA` stays the one network for training; this module reads its
state dict (or the canonical numpy weights) and runs the same function with fewer, larger kernels:

- Q, K and V in one GEMM (their weights concatenated once at load time), biases in the GEMM epilogue;
- attention through `scaled_dot_product_attention` straight on strided views of the QKV output; or, with
  `attention_kernel` where the split-K path runs, through one Triton kernel that reads the QKV output and the
  int input mask directly (`torch_kernels.attention`), the QA head then applied inside the last LayerNorm kernel;
- bias + residual + LayerNorm in one Triton kernel, bias + exact (erf) GELU in one Triton kernel, and the
  embedding sum + LayerNorm in one Triton kernel, each computing in float32 and storing in the
  activation dtype.

Per encoder layer that is 4 GEMMs, one attention call and 3 small kernels (the plain network launches
about 14). With `splitk_gemm` the GEMMs whose (N, K, M) the measured table of `torch_gemm` lists run as
split-K Triton GEMMs instead of cuBLAS: they write float32 partial sums that the LayerNorm / activation
kernel after them adds up (or, unsplit, apply bias and activation in their own epilogue).

Without Triton (CPU, or `use_triton=False`) the same stages run as plain torch ops (split-K as split
sums too), so the module is testable on CPU in float32. Importing this module imports torch; Triton is
imported only when the kernels are first used on a CUDA device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from realtime_qa.qacore.config import ModelConfig
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(precision: str) -> torch.dtype:
    try:
        return DTYPES[precision]
    except KeyError:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}") from None


@dataclass(frozen=True)
class LayerWeights:
    qkv_weight: torch.Tensor  # [3H, H]: query, key, value rows stacked
    qkv_bias: torch.Tensor  # [3H]
    attn_out_weight: torch.Tensor  # [H, H]
    attn_out_bias: torch.Tensor
    attn_ln_weight: torch.Tensor
    attn_ln_bias: torch.Tensor
    ffn_in_weight: torch.Tensor  # [I, H]
    ffn_in_bias: torch.Tensor
    ffn_out_weight: torch.Tensor  # [H, I]
    ffn_out_bias: torch.Tensor
    ffn_ln_weight: torch.Tensor
    ffn_ln_bias: torch.Tensor


class FusedBertForQA(nn.Module):
    """(input_ids, segment_ids, input_mask) int32 [B, S] -> logits float32 [B, S, 2] (start, end).

    Weights live in buffers (no parameters: this module never trains). Build it with `from_weights`
    or `from_state_dict`, then move it with `.to(device=..., dtype=...)` like any module.
    """

    def __init__(
        self,
        config: ModelConfig,
        tensors: Mapping[str, torch.Tensor],
        use_triton: bool = True,
        layer_fusion: bool = False,
        splitk_gemm: bool = False,
        attention_kernel: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.use_triton = use_triton
        # Four Triton kernels per layer (`torch_layer_kernels`) instead of GEMMs + SDPA + three small kernels.
        self.layer_fusion = layer_fusion
        # Split-K Triton GEMMs where `gemm_table` (by default torch_gemm.TABLE) lists the shape and token count.
        self.splitk_gemm = splitk_gemm
        self.gemm_table: Mapping[tuple[int, int], tuple[tuple[int, Any], ...]] | None = None
        # Where the split-K path runs: attention by our kernel straight from the QKV output and the int
        # input mask (no additive mask tensor, no SDPA), and the QA head inside the last LayerNorm kernel.
        self.attention_kernel = attention_kernel
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor.detach().clone(), persistent=True)
        # A LayerNorm that changes nothing (the layer-fused forward's first layer reads normalized input).
        self.register_buffer("unit_ln_weight", torch.ones(config.hidden_size), persistent=False)
        self.register_buffer("unit_ln_bias", torch.zeros(config.hidden_size), persistent=False)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_weights(
        cls,
        config: ModelConfig,
        weights: Mapping[str, np.ndarray],
        use_triton: bool = True,
        layer_fusion: bool = False,
        splitk_gemm: bool = False,
        attention_kernel: bool = False,
    ) -> FusedBertForQA:
        """From canonical numpy weights (`builder.checkpoint.Checkpoint.weights`, HF names)."""
        return cls.from_state_dict(
            config,
            {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in weights.items()},
            use_triton,
            layer_fusion,
            splitk_gemm,
            attention_kernel,
        )

    @classmethod
    def from_state_dict(
        cls,
        config: ModelConfig,
        state: Mapping[str, torch.Tensor],
        use_triton: bool = True,
        layer_fusion: bool = False,
        splitk_gemm: bool = False,
        attention_kernel: bool = False,
    ) -> FusedBertForQA:
        """From a `BertForQA` / HF `BertForQuestionAnswering` state dict; every needed tensor must be there."""

        def get(name: str) -> torch.Tensor:
            try:
                return state[name]
            except KeyError:
                raise KeyError(f"weights lack {name!r}") from None

        emb = "bert.embeddings."
        packed: dict[str, torch.Tensor] = {
            "word_embeddings": get(emb + "word_embeddings.weight"),
            "position_embeddings": get(emb + "position_embeddings.weight"),
            "token_type_embeddings": get(emb + "token_type_embeddings.weight"),
            "embeddings_ln_weight": get(emb + "LayerNorm.weight"),
            "embeddings_ln_bias": get(emb + "LayerNorm.bias"),
            "qa_weight": get("qa_outputs.weight"),
            "qa_bias": get("qa_outputs.bias"),
        }
        for index in range(config.num_hidden_layers):
            prefix = f"bert.encoder.layer.{index}."
            attn = prefix + "attention."
            parts = {
                "qkv_weight": torch.cat([get(f"{attn}self.{p}.weight") for p in ("query", "key", "value")]),
                "qkv_bias": torch.cat([get(f"{attn}self.{p}.bias") for p in ("query", "key", "value")]),
                "attn_out_weight": get(attn + "output.dense.weight"),
                "attn_out_bias": get(attn + "output.dense.bias"),
                "attn_ln_weight": get(attn + "output.LayerNorm.weight"),
                "attn_ln_bias": get(attn + "output.LayerNorm.bias"),
                "ffn_in_weight": get(prefix + "intermediate.dense.weight"),
                "ffn_in_bias": get(prefix + "intermediate.dense.bias"),
                "ffn_out_weight": get(prefix + "output.dense.weight"),
                "ffn_out_bias": get(prefix + "output.dense.bias"),
                "ffn_ln_weight": get(prefix + "output.LayerNorm.weight"),
                "ffn_ln_bias": get(prefix + "output.LayerNorm.bias"),
            }
            packed.update({f"layer{index}_{name}": tensor for name, tensor in parts.items()})
        return cls(config, packed, use_triton, layer_fusion, splitk_gemm, attention_kernel)

    def tensor(self, name: str) -> torch.Tensor:
        """One of the packed weights by buffer name (e.g. "word_embeddings", "layer0_qkv_weight")."""
        return cast(torch.Tensor, getattr(self, name))

    def layer_weights(self, index: int) -> LayerWeights:
        names = LayerWeights.__dataclass_fields__
        return LayerWeights(**{name: self.tensor(f"layer{index}_{name}") for name in names})

    # -- forward ------------------------------------------------------------------------------

    @property
    def _kernels(self) -> bool:
        return self.use_triton and self.tensor("word_embeddings").is_cuda

    @property
    def runs_layer_kernels(self) -> bool:
        """Whether forward runs the layer-fused Triton kernels (CUDA, a supported shape, asked for)."""
        if not (self.layer_fusion and self._kernels):
            return False
        from realtime_qa.qacore.backends import torch_layer_kernels

        config = self.config
        return torch_layer_kernels.supports(
            config.hidden_size, config.num_attention_heads, _activation(config.hidden_act)
        )

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
        if self.runs_layer_kernels:
            from realtime_qa.qacore.backends import torch_layer_kernels

            return torch_layer_kernels.forward(self, input_ids, segment_ids, input_mask)
        config = self.config
        batch, seq = input_ids.shape
        heads = config.num_attention_heads
        eps = config.layer_norm_eps
        # Split-K only at token counts its table covers: elsewhere (large batches) exactly the previous path.
        splitk = (
            self.splitk_gemm
            and _split_k_covers(batch * seq, config, self.gemm_table)
            and (not self._kernels or _hopper_or_newer(input_ids.device))
        )
        # Our attention and the QA head in the last LayerNorm: with the split-K path (PDL on CUDA), shapes it takes.
        own_attention = (
            splitk and self.attention_kernel and tl_dot_heads(config.hidden_size, config.num_attention_heads)
        )
        ops = _triton_ops(pdl=splitk, first_pdl=own_attention) if self._kernels else _TORCH_OPS
        dtype = self.tensor("word_embeddings").dtype

        x = ops.embed(
            input_ids,
            segment_ids,
            self.tensor("word_embeddings"),
            self.tensor("position_embeddings"),
            self.tensor("token_type_embeddings"),
            self.tensor("embeddings_ln_weight"),
            self.tensor("embeddings_ln_bias"),
            eps,
        )  # [B*S, H]
        mask = None if own_attention else _additive_mask(input_mask, dtype)
        act = _activation(config.hidden_act)
        gemm = _Gemm(self.gemm_table, self._kernels, enabled=splitk)
        for index in range(config.num_hidden_layers):
            prefix = f"layer{index}_"

            def w(name: str, prefix: str = prefix) -> torch.Tensor:
                return self.tensor(prefix + name)

            qkv = gemm.bias_activation(x, w("qkv_weight"), w("qkv_bias"), "none", ops)
            context = ops.attention(qkv, input_mask, heads) if mask is None else _sdpa(qkv, mask, heads)
            # Plain GEMM outputs, or with split-K float32 partial sums [splits, rows, n] the consumer adds up.
            x = ops.residual_layernorm(
                gemm.partial_products(context, w("attn_out_weight")),
                w("attn_out_bias"),
                x,
                w("attn_ln_weight"),
                w("attn_ln_bias"),
                eps,
            )
            inner = gemm.bias_activation(x, w("ffn_in_weight"), w("ffn_in_bias"), act, ops)
            last = own_attention and index == config.num_hidden_layers - 1
            x = ops.residual_layernorm(
                gemm.partial_products(inner, w("ffn_out_weight")),
                w("ffn_out_bias"),
                x,
                w("ffn_ln_weight"),
                w("ffn_ln_bias"),
                eps,
                head=(self.tensor("qa_weight"), self.tensor("qa_bias")) if last else None,
            )
        if own_attention:  # the last LayerNorm kernel applied the QA head: x is float32 logits [B*S, 2]
            return x.view(batch, seq, 2)
        return F.linear(x, self.tensor("qa_weight"), self.tensor("qa_bias")).float().view(batch, seq, 2)


def _split_k_covers(tokens: int, config: ModelConfig, table: Any) -> bool:
    from realtime_qa.qacore.backends import torch_gemm

    hidden, inner = config.hidden_size, config.intermediate_size
    return torch_gemm.covers(tokens, ((3 * hidden, hidden), (hidden, hidden), (inner, hidden), (hidden, inner)), table)


def tl_dot_heads(hidden: int, heads: int, largest: int | None = None) -> bool:
    """Whether `hidden` splits into `heads` heads whose size the Triton attention kernels take as a `tl.dot`
    tile: a power of two, at least 16 (and at most `largest`). Here, not in the kernel modules, because the
    forward decides its path with it where Triton is not installed."""
    head_dim, rest = divmod(hidden, heads)
    return rest == 0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and (largest is None or head_dim <= largest)


def _hopper_or_newer(device: torch.device) -> bool:
    """Programmatic dependent launch (`griddepcontrol`) needs compute capability 9.0, and the split-K table was
    measured on an H200: older GPUs keep the previous path (cuBLAS), whatever `splitk_gemm` says."""
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _activation(name: str) -> str:
    return {"gelu": "gelu", "relu": "relu"}.get(name, "gelu_tanh")


# -- plain torch stages (CPU, reference, torch.compile) -----------------------------------------


@dataclass(frozen=True)
class _Ops:
    embed: Callable[..., torch.Tensor]
    residual_layernorm: Callable[..., torch.Tensor]
    bias_activation: Callable[..., torch.Tensor]
    attention: Callable[..., torch.Tensor]


def _torch_embed(
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    word: torch.Tensor,
    position: torch.Tensor,
    token_type: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    seq = input_ids.shape[1]
    summed = F.embedding(input_ids, word) + position[:seq][None] + F.embedding(segment_ids, token_type)
    return F.layer_norm(summed, (word.shape[1],), ln_weight, ln_bias, eps).view(-1, word.shape[1])


def _torch_residual_layernorm(
    y: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    if y.dim() == 3:  # float32 split-K partial sums [splits, rows, n]
        y = y.sum(0)
    summed = (y + bias + residual).to(residual.dtype)
    normalized = F.layer_norm(summed, (y.shape[-1],), weight, ln_bias, eps)
    return normalized if head is None else F.linear(normalized, *head).float()


def _additive_mask(input_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int key mask [B, S] as BertForQA adds it to the scores: [B, 1, 1, S], 0 or the dtype's minimum."""
    return ((1.0 - input_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min).to(dtype)


def _sdpa(qkv: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention through `scaled_dot_product_attention` on strided views of the QKV output [B*S, 3H]
    under an additive mask [B, 1, 1, S]; the context [B*S, H]."""
    batch, seq = mask.shape[0], mask.shape[-1]
    hidden = qkv.shape[1] // 3
    parts = qkv.view(batch, seq, 3, heads, hidden // heads)
    q, k, v = (parts[:, :, part].transpose(1, 2) for part in range(3))  # [B, heads, S, d] views
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return context.transpose(1, 2).reshape(batch * seq, hidden)


def _torch_attention(qkv: torch.Tensor, input_mask: torch.Tensor, heads: int) -> torch.Tensor:
    """`torch_kernels.attention` in plain torch: the context [B*S, H] under the int key mask [B, S]."""
    return _sdpa(qkv, _additive_mask(input_mask, qkv.dtype), heads)


def _torch_bias_activation(
    y: torch.Tensor, bias: torch.Tensor, activation: str, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    if y.dim() == 3:  # float32 split-K partial sums [splits, rows, n]
        y = y.sum(0)
    y = (y + bias).to(out_dtype or y.dtype)
    if activation == "none":
        return y
    if activation == "relu":
        return F.relu(y)
    return F.gelu(y, approximate="none" if activation == "gelu" else "tanh")


_TORCH_OPS = _Ops(_torch_embed, _torch_residual_layernorm, _torch_bias_activation, _torch_attention)


class _Gemm:
    """The encoder's projections with split-K GEMMs where the table has a config, else cuBLAS (`F.linear`).

    Not `enabled`, every projection is cuBLAS: exactly the previous path. On CUDA with Triton the table's
    configs run as Triton kernels; otherwise (CPU tests) the same split sums are computed with
    `torch_gemm.torch_partials`, so the consumers' partial-sum math is testable."""

    def __init__(self, table: Any, kernels: bool, enabled: bool) -> None:
        from realtime_qa.qacore.backends import torch_gemm

        self._gemm = torch_gemm
        self._table = table
        self._kernels = kernels
        self._enabled = enabled

    def _config(self, x: torch.Tensor, weight: torch.Tensor) -> Any:
        if not self._enabled:
            return None
        return self._gemm.config_for(x.shape[0], weight.shape[0], weight.shape[1], self._table)

    def partial_products(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight.T as float32 partial sums [splits, rows, n], or unsplit [rows, n] from cuBLAS."""
        config = self._config(x, weight)
        if config is None:
            return F.linear(x, weight)
        if self._kernels:
            return cast(torch.Tensor, self._gemm.partials(x, weight, config))
        return cast(torch.Tensor, self._gemm.torch_partials(x, weight, config.split_k))

    def bias_activation(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str, ops: _Ops
    ) -> torch.Tensor:
        """activation(x @ weight.T + bias) in x's dtype: one epilogue kernel unsplit, else partials + ops."""
        config = self._config(x, weight)
        if config is None:
            if activation == "none":
                return F.linear(x, weight, bias)
            return ops.bias_activation(F.linear(x, weight), bias, activation)
        if self._kernels and config.split_k == 1:
            return cast(torch.Tensor, self._gemm.linear_epilogue(x, weight, bias, config, activation))
        return ops.bias_activation(self.partial_products(x, weight), bias, activation, x.dtype)


# -- Triton stages (CUDA) -----------------------------------------------------------------------

_TRITON_OPS: dict[tuple[bool, bool], _Ops] = {}


def _triton_ops(pdl: bool = False, first_pdl: bool = False) -> _Ops:
    """The Triton stages; with `pdl` (the split-K path) the consumers use programmatic dependent launch, and with
    `first_pdl` (the attention-kernel path) the embedding kernel lets the first GEMM launch early too."""
    key = (pdl, first_pdl)
    if key not in _TRITON_OPS:
        from realtime_qa.qacore.backends import torch_kernels

        _TRITON_OPS[key] = _Ops(
            functools.partial(torch_kernels.embed_layernorm, pdl=first_pdl),
            functools.partial(torch_kernels.residual_layernorm, pdl=pdl),
            functools.partial(torch_kernels.bias_activation, pdl=pdl),
            functools.partial(torch_kernels.attention, pdl=pdl),
        )
    return _TRITON_OPS[key]


def state_dict_for(network: Any) -> dict[str, torch.Tensor]:
    """The HF-named state dict of a `BertForQA` (or anything with `state_dict()`), detached."""
    return {name: tensor.detach() for name, tensor in network.state_dict().items()}
