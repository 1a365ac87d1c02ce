# ruff: noqa: N803 - Triton kernels name compile-time constants in capitals, by convention
"""Layer-fused BERT forward in Triton: four kernels per encoder layer, two more for the whole network.

At batch 1 the shipped model is launch-bound: its ~50 kernels each take 2-5 us and move a few
hundred KB. This forward cuts the count by moving every LayerNorm into the kernels that *read* its
output (so no kernel needs a whole row to itself) and by computing Q, K and V inside attention:

    embed        x0 = LayerNorm(word + position + token type)            (one program per token)
    attention    ctx = softmax(Q K^T + mask) V, with Q, K, V = LN(s) W + b computed in the kernel
                 (one program per batch row x head x query block; flash-style loop over key blocks)
    attn_out     s1 = ctx Wo + bo + LN(s)                               + row sums of s1, s1^2
    ffn_in       h = GELU(LN(s1) W1 + b1)
    ffn_out      s2 = h W2 + b2 + LN(s1)                                + row sums of s2, s2^2
    qa head      logits = LN(s_last) Wqa + bqa                           (float32 [T, 2])

Residual-stream sums (`s`) are kept in float32 and never normalized in memory: the GEMM that
produces one adds each row's sum and sum of squares into a small float32 buffer with atomics, and
each consumer normalizes the tiles it loads with those statistics (mean, 1/sqrt(var + eps)). So a
GEMM tile never needs the whole row, and the output projections can be tiled across many programs.
All arithmetic is float32; matrix inputs are in the weights' dtype (fp16/bf16 on GPUs).

Compared with `torch_kernels` + cuBLAS + SDPA (8-9 kernels per layer) this is 4 per layer. Importing
this module imports Triton; with TRITON_INTERPRET=1 set before the import the kernels run on CPU
tensors (the tests do so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from realtime_qa.qacore.backends.torch_fused import tl_dot_heads
from realtime_qa.qacore.backends.torch_kernels import (
    ACTIVATIONS,
    MASKED_SCORE,
    activate,
    embedding_sum,
    layernorm_store,
    softmax_step,
)


@triton.jit
def _row_stats(stats_ptr, rows, row_mask, n, eps):
    """Mean and 1/sqrt(var + eps) of rows from their (sum, sum of squares) over n columns."""
    total = tl.load(stats_ptr + rows * 2, mask=row_mask, other=0.0)
    squares = tl.load(stats_ptr + rows * 2 + 1, mask=row_mask, other=0.0)
    mean = total / n
    var = tl.maximum(squares / n - mean * mean, 0.0)
    return mean, tl.rsqrt(var + eps)


@triton.jit
def _normalized_tile(x_ptr, rows, row_mask, cols, col_mask, width, mean, rstd, gamma_ptr, beta_ptr):
    """LayerNorm of a [rows, cols] tile of a float32 [*, width] tensor; zero outside the masks."""
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * width + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = (x - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
    return tl.where(mask, y, 0.0)


@triton.jit
def _embed_kernel(
    ids_ptr,
    seg_ptr,
    word_ptr,
    pos_ptr,
    type_ptr,
    gamma_ptr,
    beta_ptr,
    out_ptr,
    stats_ptr,
    seq,
    n,
    tokens,
    stat_slots,
    eps,
    BLOCK: tl.constexpr,
    SLOTS: tl.constexpr,
):
    """x0 = LayerNorm(embeddings) in float32; stats slot 0 made an identity LN, slots 1.. zeroed."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = embedding_sum(ids_ptr, seg_ptr, word_ptr, pos_ptr, type_ptr, row, seq, n, cols, mask)
    layernorm_store(x, cols, mask, n, eps, gamma_ptr, beta_ptr, out_ptr + row * n)  # x0 is float32
    # Slot 0 describes x0 as already normalized: sum 0 and sum of squares n give mean 0, var 1, so the
    # consumers' LayerNorm (with unit gamma, zero beta) passes it through. Later slots collect atomics.
    pair = tl.arange(0, 2)
    tl.store(stats_ptr + row * 2 + pair, tl.where(pair == 0, 0.0, n * 1.0))
    slots = tl.arange(0, SLOTS)
    later = (slots[:, None] >= 1) & (slots[:, None] < stat_slots)
    offsets = (slots[:, None].to(tl.int64) * tokens + row) * 2 + pair[None, :]
    tl.store(stats_ptr + offsets, tl.zeros((SLOTS, 2), tl.float32), mask=later)


@triton.jit
def _linear_kernel(
    a_ptr,
    a_stats_ptr,
    a_gamma_ptr,
    a_beta_ptr,
    w_ptr,
    bias_ptr,
    r_ptr,
    r_stats_ptr,
    r_gamma_ptr,
    r_beta_ptr,
    out_ptr,
    out_stats_ptr,
    M,
    eps,
    N: tl.constexpr,
    K: tl.constexpr,
    NORM_A: tl.constexpr,
    RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out = act(A' W^T + bias) [+ LN(R)], A' = LN(A) when NORM_A; W is [N, K] as in nn.Linear.

    With STATS, each row's sum and sum of squares of `out` (as stored) are added to out_stats.
    """
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    if NORM_A:
        a_mean, a_rstd = _row_stats(a_stats_ptr, rows, row_mask, K, eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        if NORM_A:
            a = _normalized_tile(a_ptr, rows, row_mask, ks, k_mask, K, a_mean, a_rstd, a_gamma_ptr, a_beta_ptr)
        else:
            a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(
            w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0
        )
        acc = tl.dot(a.to(w.dtype), w, acc)
    acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc = activate(acc, ACTIVATION)
    mask = row_mask[:, None] & col_mask[None, :]
    if RESIDUAL:
        r_mean, r_rstd = _row_stats(r_stats_ptr, rows, row_mask, N, eps)
        acc += _normalized_tile(r_ptr, rows, row_mask, cols, col_mask, N, r_mean, r_rstd, r_gamma_ptr, r_beta_ptr)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], out, mask=mask)
    if STATS:
        stored = tl.where(mask, out.to(tl.float32), 0.0)
        tl.atomic_add(out_stats_ptr + rows * 2, tl.sum(stored, axis=1), mask=row_mask)
        tl.atomic_add(out_stats_ptr + rows * 2 + 1, tl.sum(stored * stored, axis=1), mask=row_mask)


@triton.jit
def _project(
    s_ptr, rows, row_mask, mean, rstd, gamma_ptr, beta_ptr, w_ptr, bias_ptr, hidden: tl.constexpr,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """LN(s[rows]) @ W^T + b for one head's [HEAD_DIM, hidden] slice of a projection: [ROWS, HEAD_DIM] f32."""
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.zeros((ROWS, HEAD_DIM), tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden
        x = _normalized_tile(s_ptr, rows, row_mask, ks, k_mask, hidden, mean, rstd, gamma_ptr, beta_ptr)
        w = tl.load(w_ptr + dims[None, :] * hidden + ks[:, None], mask=k_mask[:, None], other=0.0)
        acc = tl.dot(x.to(w.dtype), w, acc)
    return acc + tl.load(bias_ptr + dims).to(tl.float32)[None, :]


@triton.jit
def _attention_kernel(
    s_ptr,
    stats_ptr,
    gamma_ptr,
    beta_ptr,
    wqkv_ptr,
    bqkv_ptr,
    mask_ptr,
    out_ptr,
    eps,
    scale,
    seq: tl.constexpr,
    hidden: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One head's context for one query block: Q, K, V projected here from LN(s), online softmax."""
    blocks = tl.cdiv(seq, BLOCK_Q)
    batch = tl.program_id(0) // blocks
    head = tl.program_id(1)
    base = batch.to(tl.int64) * seq
    q_pos = (tl.program_id(0) % blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_valid = q_pos < seq
    q_rows = base + q_pos
    w_q = wqkv_ptr + (head * HEAD_DIM).to(tl.int64) * hidden
    w_k = w_q + hidden * hidden
    w_v = w_k + hidden * hidden
    b_q = bqkv_ptr + head * HEAD_DIM
    mean, rstd = _row_stats(stats_ptr, q_rows, q_valid, hidden, eps)
    q = _project(s_ptr, q_rows, q_valid, mean, rstd, gamma_ptr, beta_ptr, w_q, b_q, hidden, BLOCK_Q, HEAD_DIM, BLOCK_K)
    q = (q * scale).to(wqkv_ptr.dtype.element_ty)
    best = tl.full((BLOCK_Q,), MASKED_SCORE, tl.float32)
    weight = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, HEAD_DIM), tl.float32)
    for kv0 in range(0, seq, BLOCK_KV):
        k_pos = kv0 + tl.arange(0, BLOCK_KV)
        k_valid = k_pos < seq
        k_rows = base + k_pos
        k_mean, k_rstd = _row_stats(stats_ptr, k_rows, k_valid, hidden, eps)
        k = _project(
            s_ptr, k_rows, k_valid, k_mean, k_rstd, gamma_ptr, beta_ptr, w_k, b_q + hidden, hidden, BLOCK_KV,
            HEAD_DIM, BLOCK_K,
        )  # fmt: skip
        v = _project(
            s_ptr, k_rows, k_valid, k_mean, k_rstd, gamma_ptr, beta_ptr, w_v, b_q + 2 * hidden, hidden, BLOCK_KV,
            HEAD_DIM, BLOCK_K,
        )  # fmt: skip
        scores = tl.dot(q, tl.trans(k.to(q.dtype)))
        keep = tl.load(mask_ptr + k_rows, mask=k_valid, other=0) != 0
        best, weight, acc = softmax_step(scores, keep, k_valid, best, weight, acc, v.to(q.dtype))
    out = acc / weight[:, None]
    dims = tl.arange(0, HEAD_DIM)
    tl.store(
        out_ptr + q_rows[:, None] * hidden + head * HEAD_DIM + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=q_valid[:, None],
    )


# -- launchers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocks:
    """Tile sizes; `for_rows` picks them from the number of token rows in the batch."""

    linear_m: int = 32
    linear_n: int = 64
    linear_k: int = 64
    attention_q: int = 64
    attention_kv: int = 64
    warps: int = 4
    stages: int = 3

    @classmethod
    def for_rows(cls, rows: int) -> Blocks:
        if rows <= 256:
            return cls()
        if rows <= 2048:
            return cls(linear_m=64, linear_n=64)
        return cls(linear_m=128, linear_n=128, warps=8)


def linear(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    out: torch.Tensor,
    blocks: Blocks,
    eps: float,
    a_norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    residual: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    activation: str = "none",
    out_stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[M, N] = act(A' W^T + b) (+ LN(residual)); a_norm / residual carry (stats, gamma, beta)."""
    rows, width = a.shape
    n = weight.shape[0]
    a_stats, a_gamma, a_beta = a_norm if a_norm is not None else (a, bias, bias)
    r, r_stats, r_gamma, r_beta = residual if residual is not None else (a, a, bias, bias)
    block_n = min(blocks.linear_n, max(16, triton.next_power_of_2(n)))
    grid = (triton.cdiv(rows, blocks.linear_m), triton.cdiv(n, block_n))
    _linear_kernel[grid](
        a, a_stats, a_gamma, a_beta, weight, bias, r, r_stats, r_gamma, r_beta, out,
        out_stats if out_stats is not None else out, rows, eps, N=n, K=width,
        NORM_A=a_norm is not None, RESIDUAL=residual is not None, ACTIVATION=ACTIVATIONS[activation],
        STATS=out_stats is not None, BLOCK_M=blocks.linear_m, BLOCK_N=block_n, BLOCK_K=blocks.linear_k,
        num_warps=blocks.warps, num_stages=blocks.stages,
    )  # fmt: skip
    return out


def attention(
    s: torch.Tensor,
    stats: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    input_mask: torch.Tensor,
    out: torch.Tensor,
    heads: int,
    eps: float,
    blocks: Blocks,
) -> torch.Tensor:
    batch, seq = input_mask.shape
    hidden = s.shape[1]
    head_dim = hidden // heads
    grid = (batch * triton.cdiv(seq, blocks.attention_q), heads)
    _attention_kernel[grid](
        s, stats, gamma, beta, qkv_weight, qkv_bias, input_mask, out, eps, head_dim**-0.5,
        seq=seq, hidden=hidden, HEAD_DIM=head_dim, BLOCK_Q=blocks.attention_q, BLOCK_KV=blocks.attention_kv,
        BLOCK_K=blocks.linear_k,
        num_warps=blocks.warps, num_stages=blocks.stages,
    )  # fmt: skip
    return out


def supports(hidden: int, heads: int, activation: str) -> bool:
    """Whether these kernels run a model of this shape (head size a power of two, 16..128)."""
    return tl_dot_heads(hidden, heads, largest=128) and activation in ACTIVATIONS


def forward(module: Any, input_ids: torch.Tensor, segment_ids: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
    """`FusedBertForQA.forward` through the layer-fused kernels: float32 logits [B, S, 2]."""
    config = module.config
    batch, seq = input_ids.shape
    tokens = batch * seq
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    eps = config.layer_norm_eps
    word = module.tensor("word_embeddings")
    device, dtype = word.device, word.dtype
    blocks = Blocks.for_rows(tokens)
    activation = {"gelu": "gelu", "relu": "relu"}.get(config.hidden_act, "gelu_tanh")
    input_ids, segment_ids, input_mask = (t.contiguous() for t in (input_ids, segment_ids, input_mask))

    # stats[0]: x0 (identity LN); stats[2l+1]: s after layer l's attention; stats[2l+2]: after its FFN.
    stats = torch.empty((2 * layers + 1, tokens, 2), dtype=torch.float32, device=device)
    s = torch.empty((tokens, hidden), dtype=torch.float32, device=device)
    _embed_kernel[(tokens,)](
        input_ids, segment_ids, word, module.tensor("position_embeddings"), module.tensor("token_type_embeddings"),
        module.tensor("embeddings_ln_weight"), module.tensor("embeddings_ln_bias"), s, stats, seq, hidden, tokens,
        2 * layers + 1, eps, BLOCK=triton.next_power_of_2(hidden), SLOTS=triton.next_power_of_2(2 * layers + 1),
        num_warps=2 if hidden <= 512 else 4,
    )  # fmt: skip
    norm = (
        stats[0],
        module.tensor("unit_ln_weight"),
        module.tensor("unit_ln_bias"),
    )  # how to normalize `s` into the layer input
    context = torch.empty((tokens, hidden), dtype=dtype, device=device)
    inner = torch.empty((tokens, config.intermediate_size), dtype=dtype, device=device)
    for index in range(layers):
        w = module.layer_weights(index)
        attention(s, *norm, w.qkv_weight, w.qkv_bias, input_mask, context, config.num_attention_heads, eps, blocks)
        s_attn = torch.empty_like(s)
        linear(
            context, w.attn_out_weight, w.attn_out_bias, s_attn, blocks, eps,
            residual=(s, *norm), out_stats=stats[2 * index + 1],
        )  # fmt: skip
        attn_norm = (stats[2 * index + 1], w.attn_ln_weight, w.attn_ln_bias)
        linear(s_attn, w.ffn_in_weight, w.ffn_in_bias, inner, blocks, eps, a_norm=attn_norm, activation=activation)
        s = torch.empty_like(s)
        linear(
            inner, w.ffn_out_weight, w.ffn_out_bias, s, blocks, eps,
            residual=(s_attn, *attn_norm), out_stats=stats[2 * index + 2],
        )  # fmt: skip
        norm = (stats[2 * index + 2], w.ffn_ln_weight, w.ffn_ln_bias)
    logits = torch.empty((tokens, 2), dtype=torch.float32, device=device)
    linear(s, module.tensor("qa_weight"), module.tensor("qa_bias"), logits, blocks, eps, a_norm=norm)
    return logits.view(batch, seq, 2)
