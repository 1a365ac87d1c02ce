"""Split-K "skinny" GEMM for the fused BERT forward at small M (batch x sequence tokens), CUDA only.

Why: at batch 1 the encoder's GEMMs (M = 128 tokens) are bound by reading weights, and cuBLAS's small-M
kernels launch too few programs to stream them near the card's bandwidth (~0.9 TB/s of ~3-4 measured;
`benchmarks/results/engine_h100.md`). Here every program covers all M rows of a narrow slice of
output columns (BLOCK_N) and one of SPLIT_K slices of the reduction, so a 1024 x 4096 weight is read by
~128 programs at once, each through a multi-stage pipeline (`tl.dot`, wgmma on Hopper).

The kernel is launched with programmatic dependent launch (`GemmConfig.pdl`): it starts while the
kernel before it finishes and, with `prefetch`, pulls its weight slice into L2 before it waits for that
kernel's output; the consumers on this path trigger their dependents early for the same reason.

Two ways out of the kernel:

- `partials`: float32 partial sums `[SPLIT_K, M, N]`, no bias. The consumer kernels that already
  follow each GEMM (`torch_kernels.residual_layernorm`, `torch_kernels.bias_activation`) sum the
  partials and add the bias, so split-K costs neither a memset nor a separate reduction kernel;
- `linear_epilogue` (SPLIT_K = 1 only): bias and an activation in the epilogue, stored in the
  activation dtype (the QKV projection, which SDPA reads in fp16; FFN-in with GELU).

Tile and split sizes come from `TABLE`, keyed by (N, K) and chosen by measurement on an H200
(`qa-bench engine --gemm-sweep`, `benchmarks/results/engine_h200_splitk.md`); shapes or token counts
that the table does not list run through cuBLAS. Nothing is tuned at request time.

The plain-torch `torch_partials` computes the same split sums (CPU, float32: tests and reference).
Importing this module imports torch only; the kernel (`torch_kernels.skinny_gemm`) and Triton are imported
when it is first launched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    warps: int = 4
    stages: int = 4
    # Programmatic dependent launch: start while the previous kernel runs (waiting before reading its
    # output); with prefetch, first pull this program's weight slice into L2 meanwhile.
    pdl: bool = True
    prefetch: bool = False

    def fits(self, n: int, k: int) -> bool:
        """Whether the tiles cover an [N, K] weight exactly (no masks on N or K in the kernel)."""
        return n % self.block_n == 0 and k % (self.block_k * self.split_k) == 0


# (N, K) -> ((largest M, config or None), ...) by increasing M: an M takes the first entry whose largest M
# holds it; None there, an M above the last entry, or a shape not listed runs through cuBLAS.
# Chosen from the H200 sweep (see the module docstring; `benchmarks/results/engine_h200_splitk.md`): at
# M = 128, 384 and 1024 the fastest config (GEMM + the kernel consuming it, inside a CUDA graph) where it
# beat cuBLAS by 3 %. Shapes: the shipped model's (H 384, I 1536) and BERT-large's (H 1024, I 4096).
Table = Mapping[tuple[int, int], tuple[tuple[int, GemmConfig | None], ...]]
_C = GemmConfig
TABLE: Table = {
    (384, 384): ((128, _C(64, 32, 128, 3, prefetch=True, stages=5)), (384, _C(64, 32, 128, 1, stages=5)),
                 (1024, _C(64, 64, 128, 1, stages=5))),
    (384, 1536): ((128, _C(64, 32, 128, 4, stages=5)), (384, _C(64, 64, 128, 3, stages=5)),
                  (1024, _C(64, 64, 128, 1, stages=5))),
    (1152, 384): ((128, _C(64, 32, 64, 1, stages=5)), (384, _C(64, 64, 64, 1, stages=5))),
    (1536, 384): ((128, _C(64, 32, 128, 1, stages=5)), (384, _C(64, 32, 64, 1, stages=5))),
    (1024, 1024): ((128, _C(64, 64, 128, 4, prefetch=True, stages=5)), (384, _C(64, 64, 128, 1, stages=5))),
    (1024, 4096): ((128, _C(64, 64, 128, 4, stages=5)),),
    (3072, 1024): ((128, _C(64, 64, 128, 1, stages=5)),),
    (4096, 1024): ((128, _C(64, 64, 128, 1, stages=5)),),
}  # fmt: skip


def covers(m: int, shapes: Iterable[tuple[int, int]], table: Table | None = None) -> bool:
    """Whether any of these (N, K) runs split-K at M tokens (else the whole forward stays as before)."""
    return any(config_for(m, n, k, table) is not None for n, k in shapes)


def config_for(m: int, n: int, k: int, table: Table | None = None) -> GemmConfig | None:
    """The measured config for an [M, K] x [N, K]^T product, or None (use cuBLAS)."""
    for max_m, config in (TABLE if table is None else table).get((n, k), ()):
        if m <= max_m:
            return config if config is not None and config.fits(n, k) else None
    return None


# -- plain torch (CPU, reference) ----------------------------------------------------------------


def torch_partials(x: torch.Tensor, weight: torch.Tensor, split_k: int) -> torch.Tensor:
    """float32 [split_k, M, N]: the products of K's split_k contiguous slices (summed, x @ weight.T)."""
    m, k = x.shape
    n = weight.shape[0]
    xs = x.float().view(m, split_k, k // split_k).transpose(0, 1)  # [S, M, K/S]
    ws = weight.float().view(n, split_k, k // split_k).transpose(0, 1)  # [S, N, K/S]
    return torch.bmm(xs, ws.transpose(1, 2))


# -- Triton (CUDA): the kernel lives in torch_kernels, imported on first use -------------------------


def _launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, config: GemmConfig, act: str
) -> None:
    from realtime_qa.qacore.backends import torch_kernels

    if not config.fits(weight.shape[0], x.shape[1]):
        raise ValueError(f"config {config} does not tile an {list(weight.shape)} weight")
    torch_kernels.skinny_gemm(
        x, weight, bias, out, config.block_m, config.block_n, config.block_k, config.split_k, config.warps,
        config.stages, act, config.pdl, config.prefetch,
    )  # fmt: skip


def partials(x: torch.Tensor, weight: torch.Tensor, config: GemmConfig) -> torch.Tensor:
    """float32 [split_k, M, N] partial products of x [M, K] and weight [N, K] (contiguous, CUDA)."""
    out = torch.empty((config.split_k, x.shape[0], weight.shape[0]), dtype=torch.float32, device=x.device)
    _launch(x.contiguous(), weight, None, out, config, "none")
    return out


def linear_epilogue(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, config: GemmConfig, activation: str = "none"
) -> torch.Tensor:
    """activation(x @ weight.T + bias) in x's dtype, in one kernel; needs config.split_k == 1."""
    if config.split_k != 1:
        raise ValueError("the bias/activation epilogue needs split_k == 1 (else: partials + a consumer)")
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    _launch(x.contiguous(), weight, bias, out, config, activation)
    return out
