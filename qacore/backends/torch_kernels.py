# ruff: noqa: N803 - Triton kernels name compile-time constants in capitals, by convention
"""Triton kernels for the fused BERT forward (`qacore.backends.torch_fused`); CUDA only.

Each kernel reads its inputs once, computes in float32 and writes its output once in the activation
dtype: one row (token) per program for the LayerNorm kernels, flat blocks for the activation. They
replace two to five separate torch kernels each (and their intermediate tensors in device memory).
Importing this module imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2}


def _row_warps(block: int) -> int:
    return 2 if block <= 512 else 4 if block <= 2048 else 8


@triton.jit
def embedding_sum(ids_ptr, seg_ptr, word_ptr, pos_ptr, type_ptr, row, seq, n, cols, mask):
    """Word + position + token-type embedding of token `row` (position `row % seq`), in float32."""
    token = tl.load(ids_ptr + row).to(tl.int64)
    segment = tl.load(seg_ptr + row).to(tl.int64)
    position = row % seq
    x = tl.load(word_ptr + token * n + cols, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(pos_ptr + position * n + cols, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(type_ptr + segment * n + cols, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def layernorm_store(x, cols, mask, n, eps, gamma_ptr, beta_ptr, out_row_ptr):
    """LayerNorm of the float32 row `x` (n valid columns), stored in the output's dtype."""
    mean = tl.sum(x, axis=0) / n
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / n
    gamma = tl.load(gamma_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = centred * tl.rsqrt(var + eps) * gamma + beta
    tl.store(out_row_ptr + cols, y.to(out_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_layernorm_kernel(y_ptr, bias_ptr, res_ptr, gamma_ptr, beta_ptr, out_ptr, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    y = tl.load(y_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    layernorm_store(y + b + r, cols, mask, n, eps, gamma_ptr, beta_ptr, out_ptr + row * n)


@triton.jit
def _embed_layernorm_kernel(
    ids_ptr,
    seg_ptr,
    word_ptr,
    pos_ptr,
    type_ptr,
    gamma_ptr,
    beta_ptr,
    out_ptr,
    seq,
    n,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = embedding_sum(ids_ptr, seg_ptr, word_ptr, pos_ptr, type_ptr, row, seq, n, cols, mask)
    layernorm_store(x, cols, mask, n, eps, gamma_ptr, beta_ptr, out_ptr + row * n)


@triton.jit
def _bias_activation_kernel(y_ptr, bias_ptr, out_ptr, total, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    x = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(bias_ptr + offsets % n, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == 0:  # exact GELU, as nn.GELU(approximate="none")
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == 1:  # tanh approximation; tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
    else:
        x = tl.maximum(x, 0.0)
    tl.store(out_ptr + offsets, x.to(out_ptr.dtype.element_ty), mask=mask)


def residual_layernorm(
    y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm(y + bias + residual) over the last dim of 2-D contiguous [rows, n] tensors."""
    rows, n = y.shape
    out = torch.empty_like(y)
    block = triton.next_power_of_2(n)
    _residual_layernorm_kernel[(rows,)](
        y, bias, residual, gamma, beta, out, n, eps, BLOCK=block, num_warps=_row_warps(block)
    )
    return out


def embed_layernorm(
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    word: torch.Tensor,
    position: torch.Tensor,
    token_type: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """LayerNorm(word[ids] + position[0..S) + token_type[segments]) as [B*S, H]."""
    batch, seq = input_ids.shape
    n = word.shape[1]
    out = torch.empty((batch * seq, n), dtype=word.dtype, device=word.device)
    block = triton.next_power_of_2(n)
    _embed_layernorm_kernel[(batch * seq,)](
        input_ids.contiguous(),
        segment_ids.contiguous(),
        word,
        position,
        token_type,
        gamma,
        beta,
        out,
        seq,
        n,
        eps,
        BLOCK=block,
        num_warps=_row_warps(block),
    )
    return out


def bias_activation(y: torch.Tensor, bias: torch.Tensor, activation: str) -> torch.Tensor:
    """activation(y + bias) for a contiguous [rows, n] tensor; written in place over `y`."""
    total = y.numel()
    block = 2048
    _bias_activation_kernel[(triton.cdiv(total, block),)](
        y, bias, y, total, y.shape[-1], ACTIVATION=_ACTIVATIONS[activation], BLOCK=block, num_warps=8
    )
    return y
