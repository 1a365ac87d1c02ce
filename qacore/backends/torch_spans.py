# ruff: noqa: N803 - Triton kernels name compile-time constants in capitals, by convention
"""Span search on the device: the best (start, end) token pairs of each window, after the encoder.

The CPU decoder (`qacore.decoding`) reads two float32 logit rows per window and pairs the top starts
with the top ends in Python. Here the same search runs where the logits are, in the same CUDA graph
as the encoder: for every window row, the start/end score matrix restricted to the band
`0 <= end - start < max_answer_length`, to starts the featurizer allows (passage tokens of the window
that give the token its most context) and to ends it allows (passage tokens of the window), and its
`k` best entries in descending order. The engine then copies back `1 + 3k` floats per row instead of
`2 * seq`.

Per-row input (`span_flags`, int32 [B, S]): bit 0 = may start an answer, bit 1 = may end one;
column 0 (the [CLS] slot, which is never part of a span) holds the row's max answer length.
Per-row output (float32 [B, 1 + 3k]): the null logit (start[0] + end[0]), then k (start, end, logit)
triples; a slot with no valid span left holds (-1, -1, NO_SPAN).

`top_spans_reference` computes the same in plain torch (CPU tests, eager engines); `top_spans` runs
one Triton program per row (CUDA). Importing this module imports torch; Triton only when used.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

START_FLAG = 1
END_FLAG = 2
NO_SPAN = -3.0e38  # the logit of an empty slot (below any real start + end logit); literal in the kernel


def span_flags(
    seq_len: int, context_offsets: list[int], lengths: list[int], max_context: list[np.ndarray], max_answer_length: int
) -> np.ndarray:
    """int32 [rows, seq_len] flags of windows (see the module docstring), one row per window."""
    flags = np.zeros((len(lengths), seq_len), np.int32)
    for row, (offset, length, best) in enumerate(zip(context_offsets, lengths, max_context, strict=True)):
        flags[row, offset : offset + length] = END_FLAG + START_FLAG * np.asarray(best, dtype=np.int32)
    flags[:, 0] = max_answer_length
    return flags


def top_spans_reference(logits: torch.Tensor, flags: torch.Tensor, top_k: int) -> torch.Tensor:
    """float32 [B, 1 + 3 top_k] from logits [B, S, 2] and flags [B, S], in plain torch."""
    batch, seq, _ = logits.shape
    start, end = logits[..., 0].float(), logits[..., 1].float()
    positions = torch.arange(seq, device=logits.device)
    length = (positions[None, None, :] - positions[None, :, None]) + 1  # [1, S(start), S(end)]
    allowed = (
        (length >= 1)
        & (length <= flags[:, :1, None])
        & ((flags & START_FLAG) != 0)[:, :, None]
        & ((flags & END_FLAG) != 0)[:, None, :]
    )
    allowed[:, 0, :] = False  # column 0 holds the length, not flags
    allowed[:, :, 0] = False
    scores = torch.where(allowed, start[:, :, None] + end[:, None, :], torch.tensor(NO_SPAN, device=logits.device))
    best, index = scores.view(batch, seq * seq).topk(min(top_k, seq * seq), dim=1)
    found = best > -1.0e38
    starts = torch.where(found, index // seq, -1).float()
    ends = torch.where(found, index % seq, -1).float()
    best = torch.where(found, best, torch.tensor(NO_SPAN, device=logits.device))
    out = torch.full((batch, 1 + 3 * top_k), NO_SPAN, dtype=torch.float32, device=logits.device)
    out[:, 0] = start[:, 0] + end[:, 0]
    triples = torch.stack((starts, ends, best), dim=2).reshape(batch, -1)
    out[:, 1 : 1 + triples.shape[1]] = triples
    if triples.shape[1] < 3 * top_k:  # fewer pairs than k: the rest are empty slots
        out[:, 1 + triples.shape[1] :: 3] = -1
        out[:, 2 + triples.shape[1] :: 3] = -1
    return out


def top_spans(logits: torch.Tensor, flags: torch.Tensor, top_k: int, band: int) -> torch.Tensor:
    """`top_spans_reference` in one Triton program per row; answers longer than `band` tokens are not searched
    (callers send rows whose max answer length is at most `band`)."""
    import triton

    batch, seq, _ = logits.shape
    out = torch.empty((batch, 1 + 3 * top_k), dtype=torch.float32, device=logits.device)
    block_seq = triton.next_power_of_2(seq)
    block_band = triton.next_power_of_2(band)
    warps = 4 if block_seq * block_band <= 8192 else 8
    _kernel()[(batch,)](logits, flags, out, seq, TOP_K=top_k, BLOCK_SEQ=block_seq, BAND=block_band, num_warps=warps)
    return out


_KERNEL: Any = None


def _kernel() -> Any:
    """The Triton kernel, defined on first use so that importing this module never imports Triton."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def top_spans_kernel(
        logits_ptr, flags_ptr, out_ptr, seq, TOP_K: tl.constexpr, BLOCK_SEQ: tl.constexpr, BAND: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        base = row * seq
        starts = tl.arange(0, BLOCK_SEQ)
        offsets = tl.arange(0, BAND)
        ends = starts[:, None] + offsets[None, :]  # [BLOCK_SEQ, BAND]
        max_length = tl.load(flags_ptr + base)
        start_ok = (starts >= 1) & (starts < seq)
        start_flags = tl.load(flags_ptr + base + starts, mask=start_ok, other=0)
        start_logits = tl.load(logits_ptr + (base + starts) * 2, mask=start_ok, other=0.0)
        end_ok = (ends < seq) & (offsets[None, :] < max_length) & start_ok[:, None]
        end_ok &= (start_flags & 1)[:, None] != 0
        end_flags = tl.load(flags_ptr + base + ends, mask=end_ok, other=0)
        end_ok &= (end_flags & 2) != 0
        end_logits = tl.load(logits_ptr + (base + ends) * 2 + 1, mask=end_ok, other=0.0)
        scores = tl.where(end_ok, start_logits[:, None] + end_logits, -3.0e38)
        flat_index = starts[:, None] * BAND + offsets[None, :]
        # One int64 key per pair, so each pick is a single max-reduction: the score's bits made orderable as
        # a signed integer (flip the magnitude bits of negatives) above the inverted flat index (ties go to
        # the earlier start, then the shorter span).
        bits = scores.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = (ordered.to(tl.int64) << 32) | (BLOCK_SEQ * BAND - 1 - flat_index).to(tl.int64)
        null = tl.load(logits_ptr + base * 2) + tl.load(logits_ptr + base * 2 + 1)
        out = out_ptr + row * (1 + 3 * TOP_K)
        tl.store(out, null)
        for slot in range(TOP_K):
            best_key = tl.max(tl.max(key, axis=1), axis=0)
            index = BLOCK_SEQ * BAND - 1 - (best_key & 0xFFFFFFFF).to(tl.int32)
            best_ordered = (best_key >> 32).to(tl.int32)
            best = (best_ordered ^ ((best_ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
            found = best > -1.0e38
            start = index // BAND
            tl.store(out + 1 + 3 * slot, tl.where(found, start, -1).to(tl.float32))
            tl.store(out + 2 + 3 * slot, tl.where(found, start + index % BAND, -1).to(tl.float32))
            tl.store(out + 3 + 3 * slot, tl.where(found, best, -3.0e38))
            key = tl.where(flat_index == index, -9223372036854775807, key)

    _KERNEL = top_spans_kernel
    return _KERNEL
