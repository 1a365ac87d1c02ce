"""Tile/split sweep of the split-K GEMM (`qacore.backends.torch_gemm`) against cuBLAS, on the GPU.

For each encoder projection of the benchmark's models (QKV, attention output, FFN in, FFN out) and
each token count M, every candidate config is timed *with the kernel that consumes its output*, as the
engine runs them: QKV + bias (cuBLAS epilogue, or ours), attention-out / FFN-out + bias + residual +
LayerNorm, FFN-in + bias + GELU. The baseline is what the `fused` engine launches (`F.linear` and the
Triton consumer). Timing: one CUDA graph of R launches over R copies of the weight (so the weights are
not served from L2 more than in a real forward), replayed in blocks, median per launch. Every config's
output is compared with a float32 reference (relative L2 error), like the baseline's.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LARGE = {"bert-large": (1024, 4096), "bert-base": (768, 3072)}  # (hidden, intermediate)
ROLES = ("qkv", "attn_out", "ffn_in", "ffn_out")
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)
ROTATION_BYTES = 256 << 20  # weights cycled through per graph: well over the 50 MB L2
MAX_ROTATION = 32
WIN_MARGIN = 0.97  # a config must beat cuBLAS by 3 % to be taken


def model_shapes(models: Sequence[str], shipped_dir: Path) -> list[dict[str, Any]]:
    """[{model, role, n, k}] for the four projections of each model."""
    shapes = []
    for model in models:
        if model == "shipped":
            raw = json.loads((shipped_dir / "config.json").read_text(encoding="utf-8"))
            hidden, inner = int(raw["hidden_size"]), int(raw["intermediate_size"])
        else:
            hidden, inner = LARGE[model]
        dims = {"qkv": (3 * hidden, hidden), "attn_out": (hidden, hidden), "ffn_in": (inner, hidden)}
        dims["ffn_out"] = (hidden, inner)
        shapes += [{"model": model, "role": role, "n": dims[role][0], "k": dims[role][1]} for role in ROLES]
    return shapes


def candidates() -> list[Any]:
    from realtime_qa.qacore.backends.torch_gemm import GemmConfig

    configs = []
    for block_m in (64, 128):
        for block_n in (32, 64, 128):
            for block_k in (64, 128):
                stage_bytes = (block_m + block_n) * block_k * 2
                stages = max(2, min(5, (160 << 10) // stage_bytes))
                for pdl, prefetch in ((False, False), (True, False), (True, True)):
                    configs.append(GemmConfig(block_m, block_n, block_k, 1, 4, stages, pdl, prefetch))
    return configs


def _time_graph(launch: Callable[[int], Any], rotation: int, blocks: int = 5, replays: int = 4) -> float:
    """Median microseconds per launch of `launch(i)` for i in range(rotation), captured in one graph."""
    import torch

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(rotation):  # compile / warm outside the capture
            launch(i)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for i in range(rotation):
                launch(i)
        for _ in range(3):
            graph.replay()
        stream.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(blocks):
            start.record(stream)
            for _ in range(replays):
                graph.replay()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000.0 / (replays * rotation))
    return statistics.median(times)


def _ops(role: str, m: int, n: int, k: int) -> dict[str, Any]:
    """Inputs, rotated weights, the float32 reference and the baseline / split-K launches of one role."""
    import torch
    import torch.nn.functional as F
    from realtime_qa.qacore.backends import torch_gemm, torch_kernels

    device, dtype = "cuda", torch.float16
    rotation = max(2, min(MAX_ROTATION, ROTATION_BYTES // (n * k * 2)))
    x = torch.randn(m, k, device=device, dtype=dtype)
    weights = [(torch.randn(n, k, device=device) * k**-0.5).to(dtype) for _ in range(rotation)]
    bias = torch.randn(n, device=device, dtype=dtype) * 0.1
    residual = torch.randn(m, n, device=device, dtype=dtype)
    gamma = 1.0 + 0.1 * torch.randn(n, device=device, dtype=dtype)
    beta = 0.1 * torch.randn(n, device=device, dtype=dtype)
    y32 = x.float() @ weights[0].float().T + bias.float()
    if role == "qkv":
        reference = y32
    elif role == "ffn_in":
        reference = F.gelu(y32)
    else:
        reference = F.layer_norm(y32 + residual.float(), (n,), gamma.float(), beta.float(), 1e-12)

    def baseline(i: int) -> Any:
        if role == "qkv":
            return F.linear(x, weights[i], bias)
        if role == "ffn_in":
            return torch_kernels.bias_activation(F.linear(x, weights[i]), bias, "gelu")
        return torch_kernels.residual_layernorm(F.linear(x, weights[i]), bias, residual, gamma, beta, 1e-12)

    def splitk(config: Any) -> Callable[[int], Any]:
        activation = {"qkv": "none", "ffn_in": "gelu"}.get(role)

        def launch(i: int) -> Any:
            if activation is not None and config.split_k == 1:
                return torch_gemm.linear_epilogue(x, weights[i], bias, config, activation)
            partial = torch_gemm.partials(x, weights[i], config)
            if activation is not None:
                return torch_kernels.bias_activation(partial, bias, activation, dtype, pdl=True)
            return torch_kernels.residual_layernorm(partial, bias, residual, gamma, beta, 1e-12, pdl=True)

        return launch

    return {"rotation": rotation, "reference": reference, "baseline": baseline, "splitk": splitk}


def _error(out: Any, reference: Any) -> float:
    return float((out.float() - reference).norm() / reference.norm())


def sweep(shapes: list[dict[str, Any]], token_counts: Sequence[int]) -> list[dict[str, Any]]:
    """One row per (shape, M, config): microseconds per launch and relative error; config None = cuBLAS."""
    rows: list[dict[str, Any]] = []
    configs = candidates()
    for shape in shapes:
        n, k = shape["n"], shape["k"]
        for m in token_counts:
            ops = _ops(shape["role"], m, n, k)
            base_us = _time_graph(ops["baseline"], ops["rotation"])
            base = {
                **shape,
                "m": m,
                "config": None,
                "us": base_us,
                "rel_err": _error(ops["baseline"](0), ops["reference"]),
            }
            rows.append(base)
            best = (float("inf"), None)
            for config in configs:
                for split in SPLITS:
                    trial = replace(config, split_k=split)
                    programs = (n // trial.block_n) * split * -(-m // trial.block_m)
                    if not trial.fits(n, k) or not 16 <= programs <= 8 * 132:
                        continue
                    try:
                        launch = ops["splitk"](trial)
                        error = _error(launch(0), ops["reference"])
                        us = _time_graph(launch, ops["rotation"])
                    except Exception as exc:  # a config that does not compile (shared memory) is skipped
                        log.info("skip %s: %s", trial, str(exc).splitlines()[0][:120])
                        continue
                    rows.append({**shape, "m": m, "config": asdict(trial), "us": us, "rel_err": error})
                    if us < best[0] and error <= max(2 * base["rel_err"], 2e-3):
                        best = (us, trial)
            print(
                f"gemm {shape['model']} {shape['role']} N={n} K={k} M={m}: cuBLAS {base_us:.2f} us "
                f"(err {base['rel_err']:.1e}), best split-K {best[0]:.2f} us {best[1]}",
                flush=True,
            )
    return rows


def winners_table(rows: list[dict[str, Any]]) -> dict[tuple[int, int], tuple[tuple[int, Any], ...]]:
    """torch_gemm's table from a sweep: per (N, K) and M, the fastest correct config if it beats cuBLAS."""
    from realtime_qa.qacore.backends.torch_gemm import GemmConfig

    table: dict[tuple[int, int], list[tuple[int, Any]]] = {}
    keys = sorted({(row["n"], row["k"], row["m"]) for row in rows})
    for n, k, m in keys:
        here = [row for row in rows if (row["n"], row["k"], row["m"]) == (n, k, m)]
        base = next(row for row in here if row["config"] is None)
        good = [r for r in here if r["config"] is not None and r["rel_err"] <= max(2 * base["rel_err"], 2e-3)]
        best = min(good, key=lambda row: row["us"], default=None)
        won = best is not None and best["us"] < WIN_MARGIN * base["us"]
        table.setdefault((n, k), []).append((m, GemmConfig(**best["config"]) if won and best else None))
    # Entries past the last winner change nothing (cuBLAS either way).
    trimmed = {}
    for key, entries in table.items():
        while entries and entries[-1][1] is None:
            entries.pop()
        if entries:
            trimmed[key] = tuple(entries)
    return trimmed


def table_literal(table: Any) -> str:
    """The table as Python source for torch_gemm.TABLE."""
    lines = ["TABLE: Table = {"]
    for (n, k), entries in sorted(table.items()):
        cells = ", ".join(
            f"({m}, None)"
            if config is None
            else f"({m}, GemmConfig({config.block_m}, {config.block_n}, {config.block_k}, {config.split_k}, "
            f"{config.warps}, {config.stages}, {config.pdl}, {config.prefetch}))"
            for m, config in entries
        )
        lines.append(f"    ({n}, {k}): ({cells},),")
    lines.append("}")
    return "\n".join(lines)


def table_json(table: Any) -> list[dict[str, Any]]:
    """The table as JSON rows (the report's "gemm_table"; `--gemm-table` of squad_f1 reads it back)."""
    return [
        {"n": n, "k": k, "max_m": m, "config": None if config is None else asdict(config)}
        for (n, k), entries in sorted(table.items())
        for m, config in entries
    ]


def table_from_json(rows: list[dict[str, Any]]) -> dict[tuple[int, int], tuple[tuple[int, Any], ...]]:
    from realtime_qa.qacore.backends.torch_gemm import GemmConfig

    table: dict[tuple[int, int], list[tuple[int, Any]]] = {}
    for row in rows:
        config = None if row["config"] is None else GemmConfig(**row["config"])
        table.setdefault((row["n"], row["k"]), []).append((row["max_m"], config))
    return {key: tuple(sorted(entries, key=lambda entry: entry[0])) for key, entries in table.items()}
