# ruff: noqa: N803 - Triton kernels name compile-time constants in capitals, by convention
"""Triton kernels for the fused BERT forward (`qacore.backends.torch_fused`); CUDA only.

Each kernel reads its inputs once, computes in float32 and writes its output once in the activation
dtype: one row (token) per program for the LayerNorm kernels, flat blocks for the activation. They
replace two to five separate torch kernels each (and their intermediate tensors in device memory).
The residual + LayerNorm and bias + activation kernels also take the float32 split-K partial sums of the
GEMM before them (`torch_gemm.partials`, `[splits, rows, n]`) and add them up as they load, so a split-K
GEMM needs no memset and no reduction kernel of its own. Importing this module imports Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from realtime_qa.qacore.backends.torch_fused import tl_dot_heads
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)
ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "none": 3}
# A padded key's score: exp() gives 0 unless every key of the row is padding (then the row averages them,
# as the additive-mask reference does). A key past the sequence end (a partial block) never weighs anything.
MASKED_SCORE = tl.constexpr(-1.0e30)
OUT_OF_RANGE_SCORE = tl.constexpr(-3.0e38)


def _row_warps(block: int) -> int:
    return 2 if block <= 512 else 4 if block <= 2048 else 8


@triton.jit
def activate(x, ACTIVATION: tl.constexpr):
    """The activation ACTIVATION (ACTIVATIONS) of float32 `x`."""
    if ACTIVATION == 0:  # exact GELU, as nn.GELU(approximate="none")
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == 1:  # tanh approximation; tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
    elif ACTIVATION == 2:
        x = tl.maximum(x, 0.0)
    return x


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
def layernorm_row(x, cols, mask, n, eps, gamma_ptr, beta_ptr):
    """LayerNorm of the float32 row `x` (n valid columns), in float32; zero outside the mask."""
    mean = tl.sum(x, axis=0) / n
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / n
    gamma = tl.load(gamma_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return centred * tl.rsqrt(var + eps) * gamma + beta


@triton.jit
def layernorm_store(x, cols, mask, n, eps, gamma_ptr, beta_ptr, out_row_ptr):
    """LayerNorm of the float32 row `x` (n valid columns), stored in the output's dtype."""
    y = layernorm_row(x, cols, mask, n, eps, gamma_ptr, beta_ptr)
    tl.store(out_row_ptr + cols, y.to(out_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_layernorm_kernel(
    y_ptr,
    bias_ptr,
    res_ptr,
    gamma_ptr,
    beta_ptr,
    head_w_ptr,
    head_b_ptr,
    out_ptr,
    n,
    eps,
    split_stride,
    SPLITS: tl.constexpr,
    HEAD: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    if PDL:  # let the next kernel launch (and prefetch its weights) now; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    y = tl.load(y_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    for split in tl.static_range(1, SPLITS):  # split-K partial sums of the GEMM, if any
        y += tl.load(y_ptr + split * split_stride + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    if HEAD == 0:
        layernorm_store(y + b + r, cols, mask, n, eps, gamma_ptr, beta_ptr, out_ptr + row * n)
    else:
        # The QA head on the normalized row, rounded to the residual's dtype first as the unfused path
        # stores it: HEAD float32 logits per row (out is [rows, HEAD]); the row itself is never stored.
        y = layernorm_row(y + b + r, cols, mask, n, eps, gamma_ptr, beta_ptr)
        y = y.to(res_ptr.dtype.element_ty).to(tl.float32)
        for c in tl.static_range(HEAD):
            w = tl.load(head_w_ptr + c * n + cols, mask=mask, other=0.0).to(tl.float32)
            logit = tl.sum(y * w, axis=0) + tl.load(head_b_ptr + c).to(tl.float32)
            tl.store(out_ptr + row * HEAD + c, logit)


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
    PDL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    if PDL:  # the first kernel of the forward reads only the inputs: no wait, just let the next one launch
        gdc_launch_dependents()
    x = embedding_sum(ids_ptr, seg_ptr, word_ptr, pos_ptr, type_ptr, row, seq, n, cols, mask)
    layernorm_store(x, cols, mask, n, eps, gamma_ptr, beta_ptr, out_ptr + row * n)


@triton.jit
def _bias_activation_kernel(
    y_ptr,
    bias_ptr,
    out_ptr,
    total,
    n,
    SPLITS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    if PDL:  # as in _residual_layernorm_kernel
        gdc_launch_dependents()
        gdc_wait()
    x = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    for split in tl.static_range(1, SPLITS):  # split-K partial sums of the GEMM, if any
        x += tl.load(y_ptr + split * total + offsets, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(bias_ptr + offsets % n, mask=mask, other=0.0).to(tl.float32)
    x = activate(x, ACTIVATION)
    tl.store(out_ptr + offsets, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_step(scores, kept, in_range, running_max, running_sum, acc, v):
    """One key block of flash attention: float32 `scores` [queries, keys] with padded keys (not `kept`) and keys
    past the sequence (not `in_range`) left out; the running max and sum of exp() and the weighted sum of the
    value rows `v` [keys, d], updated."""
    scores = tl.where(kept[None, :], scores, MASKED_SCORE)
    scores = tl.where(in_range[None, :], scores, OUT_OF_RANGE_SCORE)
    block_max = tl.maximum(running_max, tl.max(scores, axis=1))
    weights = tl.exp(scores - block_max[:, None])
    rescale = tl.exp(running_max - block_max)
    running_sum = running_sum * rescale + tl.sum(weights, axis=1)
    acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
    return block_max, running_sum, acc


@triton.jit
def _attention_kernel(
    qkv_ptr,
    mask_ptr,
    out_ptr,
    scale,
    SEQ: tl.constexpr,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    """softmax(Q K^T * scale, padded keys left out) V for one query block of one head of one batch row.

    Q, K and V are the column blocks of the QKV GEMM's output `[B*S, 3H]` (heads side by side in each);
    the key mask is the engine's int input mask `[B, S]` (0 = padding); the context goes to `[B*S, H]`.
    Flash-style: a running max and sum over key blocks, float32 scores and sums."""
    pid_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // HEADS
    head = batch_head % HEADS
    hidden = HEADS * HEAD_DIM
    if PDL:  # as in _residual_layernorm_kernel
        gdc_launch_dependents()
        gdc_wait()
    queries = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    query_ok = queries < SEQ
    dims = tl.arange(0, HEAD_DIM)
    first_token = batch.to(tl.int64) * SEQ
    head_cols = head * HEAD_DIM + dims
    q = tl.load(
        qkv_ptr + (first_token + queries)[:, None] * (3 * hidden) + head_cols[None, :],
        mask=query_ok[:, None],
        other=0.0,
    )
    running_max = tl.full((BLOCK_M,), OUT_OF_RANGE_SCORE, tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for start in range(0, SEQ, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < SEQ
        key_rows = (first_token + keys)[:, None] * (3 * hidden)
        k = tl.load(qkv_ptr + key_rows + hidden + head_cols[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(qkv_ptr + key_rows + 2 * hidden + head_cols[None, :], mask=key_ok[:, None], other=0.0)
        kept = tl.load(mask_ptr + first_token + keys, mask=key_ok, other=0) != 0
        scores = tl.dot(q, tl.trans(k)) * scale
        running_max, running_sum, acc = softmax_step(scores, kept, key_ok, running_max, running_sum, acc, v)
    context = acc / running_sum[:, None]
    tl.store(
        out_ptr + (first_token + queries)[:, None] * hidden + head_cols[None, :],
        context.to(out_ptr.dtype.element_ty),
        mask=query_ok[:, None],
    )


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    k_split,
    K_STEPS: tl.constexpr,
    PARTIALS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """x [M, K] @ w[N, K]^T over one K slice (`torch_gemm`): float32 partials, or + bias + activation.

    With PDL (programmatic dependent launch) the kernel may start while the previous kernel still runs:
    it touches nothing that kernel writes before `gdc_wait`, and with PREFETCH it first asks L2 for its
    whole weight slice (which no kernel writes), so the weight stream overlaps the previous kernel."""
    # Grid (N tiles, K splits, M tiles): neighbouring programs stream neighbouring weight rows.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * k_split + tl.arange(0, BLOCK_K)
    row_ok = rows[:, None] < M
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * K + ks[None, :]  # N and K are tile multiples: no masks
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PDL:
        if PREFETCH:  # one prefetch per 128-byte line of this program's [BLOCK_N, k_split] weight slice
            lines = (
                w_ptr + cols[:, None].to(tl.int64) * K + (pid_k * k_split + tl.arange(0, BLOCK_K // 64) * 64)[None, :]
            )
            for _ in range(0, k_split, BLOCK_K):
                tl.inline_asm_elementwise(
                    "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [lines], dtype=tl.int32, is_pure=False, pack=1
                )
                lines += BLOCK_K
        gdc_wait()
    # A run-time trip count (one compiled kernel for every split of a config), software-pipelined over
    # num_stages. K_STEPS > 0 only under Triton's interpreter, whose run-time scalars cannot bound a range.
    for _ in range(0, K_STEPS * BLOCK_K if K_STEPS > 0 else k_split, BLOCK_K):
        x = tl.load(x_ptrs, mask=row_ok, other=0.0)
        w = tl.load(w_ptrs)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if PDL:
        gdc_launch_dependents()
    offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    if PARTIALS:
        tl.store(out_ptr + pid_k.to(tl.int64) * M * N + offsets, acc, mask=row_ok)
    else:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        acc = activate(acc, ACTIVATION)
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


def residual_layernorm(
    y: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    pdl: bool = False,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """LayerNorm(y + bias + residual) over the last dim of contiguous [rows, n] tensors, in residual's dtype.

    `y` may also be float32 split-K partial sums `[splits, rows, n]` (summed first). `pdl`: launched with
    programmatic dependent launch (the split-K path; see `_skinny_gemm_kernel`). With `head` (weight
    [c, n], bias [c]: the QA outputs layer) the result is instead that layer applied to the normalized rows,
    float32 [rows, c], in the same kernel."""
    rows, n = residual.shape
    splits = y.shape[0] if y.dim() == 3 else 1
    if head is None:
        out = torch.empty_like(residual)
        head_weight, head_bias = gamma, beta  # not read
    else:
        head_weight, head_bias = head
        out = torch.empty((rows, head_weight.shape[0]), dtype=torch.float32, device=residual.device)
    block = triton.next_power_of_2(n)
    _residual_layernorm_kernel[(rows,)](
        y,
        bias,
        residual,
        gamma,
        beta,
        head_weight,
        head_bias,
        out,
        n,
        eps,
        rows * n,
        SPLITS=splits,
        HEAD=0 if head is None else head_weight.shape[0],
        PDL=pdl and not _INTERPRETED,
        BLOCK=block,
        num_warps=_row_warps(block),
        launch_pdl=pdl and not _INTERPRETED,
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
    pdl: bool = False,
) -> torch.Tensor:
    """LayerNorm(word[ids] + position[0..S) + token_type[segments]) as [B*S, H]. With `pdl` the next kernel,
    if launched with programmatic dependent launch, may start (and wait for this one's output) right away."""
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
        PDL=pdl and not _INTERPRETED,
        BLOCK=block,
        num_warps=_row_warps(block),
    )
    return out


def bias_activation(
    y: torch.Tensor, bias: torch.Tensor, activation: str, out_dtype: torch.dtype | None = None, pdl: bool = False
) -> torch.Tensor:
    """activation(y + bias) for a contiguous [rows, n] tensor; written in place over `y`.

    `y` may also be float32 split-K partial sums `[splits, rows, n]`: they are summed, and the result is
    a new [rows, n] tensor of `out_dtype` (activation "none" adds the bias only)."""
    if y.dim() == 3:
        splits = y.shape[0]
        out = torch.empty(y.shape[1:], dtype=out_dtype or y.dtype, device=y.device)
    else:
        splits, out = 1, y
    total = out.numel()
    block = 2048
    _bias_activation_kernel[(triton.cdiv(total, block),)](
        y,
        bias,
        out,
        total,
        out.shape[-1],
        SPLITS=splits,
        ACTIVATION=ACTIVATIONS[activation],
        PDL=pdl and not _INTERPRETED,
        BLOCK=block,
        num_warps=8,
        launch_pdl=pdl and not _INTERPRETED,
    )
    return out


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    block_m: int,
    block_n: int,
    block_k: int,
    split_k: int,
    warps: int,
    stages: int,
    activation: str = "none",
    pdl: bool = False,
    prefetch: bool = False,
) -> None:
    """out = x @ weight.T, split over K: float32 partials [split_k, M, N] when `bias` is None, else
    activation(. + bias) [M, N] (split_k 1). N must be a multiple of block_n, K of block_k * split_k."""
    m, k = x.shape
    n = weight.shape[0]
    _skinny_gemm_kernel[(n // block_n, split_k, triton.cdiv(m, block_m))](
        x,
        weight,
        out if bias is None else bias,  # not read when PARTIALS
        out,
        m,
        n,
        k,
        k // split_k,
        K_STEPS=k // split_k // block_k if _INTERPRETED else 0,
        PARTIALS=bias is None,
        ACTIVATION=ACTIVATIONS[activation],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PDL=pdl and not _INTERPRETED,
        PREFETCH=prefetch,
        num_warps=warps,
        num_stages=stages,
        launch_pdl=pdl and not _INTERPRETED,
    )


@dataclass(frozen=True)
class AttentionTiles:
    """Tiles of `_attention_kernel`: query rows per program, keys per step, warps."""

    block_m: int
    block_n: int
    warps: int = 4
    stages: int = 2


def attention_tiles(seq: int, head_dim: int) -> AttentionTiles:
    """Tiles for one sequence length: small query blocks so even batch 1 spreads over many programs
    (12 heads x 128 tokens is 48 programs of 32 rows); keys in one step up to 128."""
    return AttentionTiles(block_m=32 if seq <= 256 else 64, block_n=min(128, max(16, triton.next_power_of_2(seq))))


def attention(qkv: torch.Tensor, input_mask: torch.Tensor, heads: int, pdl: bool = False) -> torch.Tensor:
    """Multi-head attention straight from the QKV GEMM's output: `qkv` [B*S, 3H] (query, key, value
    column blocks), `input_mask` int [B, S] (0: a padded key, left out); the context [B*S, H] in qkv's
    dtype. Scores scaled by 1/sqrt(head dim), as `scaled_dot_product_attention`."""
    batch, seq = input_mask.shape
    hidden = qkv.shape[1] // 3
    head_dim = hidden // heads
    if qkv.shape[0] != batch * seq or not tl_dot_heads(hidden, heads):
        raise ValueError(f"attention needs [B*S, 3H] with a power-of-two head dim >= 16, got {list(qkv.shape)}")
    tiles = attention_tiles(seq, head_dim)
    out = torch.empty((batch * seq, hidden), dtype=qkv.dtype, device=qkv.device)
    _attention_kernel[(triton.cdiv(seq, tiles.block_m), batch * heads)](
        qkv,
        input_mask.contiguous(),
        out,
        head_dim**-0.5,
        SEQ=seq,
        HEADS=heads,
        HEAD_DIM=head_dim,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        PDL=pdl and not _INTERPRETED,
        num_warps=tiles.warps,
        num_stages=tiles.stages,
        launch_pdl=pdl and not _INTERPRETED,
    )
    return out
