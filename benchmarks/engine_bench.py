"""`qa-bench engine`: GPU engine latency and throughput, measured the way NVIDIA's BERT samples do.

Random token ids (full-length windows, two segments), the engine alone timed between CUDA events on
its stream, warm-up first, then many iterations; mean / p50 / p95 / p99 latency and sequences per
second, for each batch size and sequence length, on BERT-base and BERT-large shapes (random weights)
and the shipped model (its real weights). Every row carries its baselines, measured in the same run
on the same weights right beside it:

    hf_eager      transformers BertForQuestionAnswering, fp16, eager (SDPA attention)
    torch_graphs  the training network BertForQA, fp16, CUDA graphs (TorchCudaEngine fused=False)
    fused         FusedBertForQA, fp16, cuBLAS GEMMs + SDPA + three Triton kernels per layer, CUDA graphs
                  (TorchEngineConfig splitk_gemm=False: the previous engine, the baseline of goal 4)
    fused_lt      the same, GEMMs captured through cuBLASLt (torch.backends.cuda.preferred_blas_library)
    compiled      FusedBertForQA through torch.compile(mode), then CUDA graphs (only with --compile-mode)
    fused_spans   `fused` with the device span search in the same graph (what `infer_spans` replays)
    layer         four Triton kernels per layer (torch_layer_kernels), CUDA graphs (experiment)
    layer_spans   `layer` with the device span search in the same graph
    splitk        `fused` with split-K Triton GEMMs (torch_gemm) where its measured table lists the shape
                  (TorchEngineConfig attention_kernel=False: the engine before the attention kernel)
    splitk_spans  `splitk` with the device span search in the same graph
    attention     `splitk` with the Triton attention kernel and the QA head in the last LayerNorm where the
                  split-K path runs (the engine's default: TorchEngineConfig())
    attention_spans  `attention` with the device span search in the same graph

`--gemm-sweep M,...` first times every tile/split config of `torch_gemm` against cuBLAS on each encoder
projection of the models, at those token counts (each GEMM with the kernel that consumes it), checks
their numbers against float32, prints the table of winners and uses it for the `splitk` variants of the
same run (`torch_gemm.TABLE` holds the committed table).

`--attention-sweep BxS,...` times the `attention` variant at those shapes with each tile set of
ATTENTION_SWEEP (whole graph replays, a fresh engine each).

`--e2e` adds end-to-end latency on SQuAD dev questions (tokenize + infer + decode, one question at a
time) through `QuestionAnswerer` with each engine. Writes JSON (--out) and prints a table.
Needs a CUDA GPU, torch and transformers (dev extras).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from realtime_qa.benchmarks.report import IN_PROCESS_STAGES
from realtime_qa.qacore.config import ModelConfig
from realtime_qa.qacore.engine import Engine, EngineMeta, EngineOutputs
from realtime_qa.qacore.features import EngineInputs

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL_DIR = REPO / "models" / "minilm-l6-squad"
MODEL_SHAPES = {
    "bert-base": ModelConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": ModelConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
VARIANTS = (
    "hf_eager",
    "torch_graphs",
    "fused",
    "fused_lt",
    "compiled",
    "fused_spans",
    "layer",
    "layer_spans",
    "splitk",
    "splitk_spans",
    "attention",
    "attention_spans",
)
SPAN_VARIANTS = ("fused_spans", "layer_spans", "splitk_spans", "attention_spans")
PRODUCT = "fused"  # the variant the speed-up and seq/s columns describe
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_SEQUENCE_LENGTHS = (128, 384)
# Issue 12, goal 4 (H200, fp16, engine only): (model, batch, seq) -> ("p50_ms" max | "throughput" min, value)
GOALS = {
    ("shipped", 1, 128): ("p50_ms", 0.12),
    ("bert-large", 1, 128): ("p50_ms", 0.7),
}


@dataclass(frozen=True)
class BenchConfig:
    models: tuple[str, ...] = ("shipped", "bert-base", "bert-large")
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    sequence_lengths: tuple[int, ...] = DEFAULT_SEQUENCE_LENGTHS
    variants: tuple[str, ...] = ("hf_eager", "torch_graphs", "fused", "fused_spans")
    precision: str = "fp16"
    warmup_s: float = 0.1
    min_iterations: int = 30
    min_time_s: float = 0.3
    max_iterations: int = 2000
    compile_mode: str | None = None  # adds the "compiled" variant
    compile_shapes: tuple[tuple[int, int], ...] = ((1, 128),)  # (batch, seq) the compiled variant is timed at
    shipped_model: Path = SHIPPED_MODEL_DIR
    e2e_squad: Path | None = None  # SQuAD dev JSON(.gz) for the end-to-end rows
    e2e_questions: int = 300
    profile_shapes: tuple[tuple[int, int], ...] = ()  # (batch, seq) whose kernels are listed per model
    block_sweep: tuple[tuple[int, int], ...] = ()  # (batch, seq) where the layer kernels' tile sizes are swept
    attention_sweep: tuple[tuple[int, int], ...] = ()  # (batch, seq) where the attention kernel's tiles are swept
    gemm_sweep: tuple[int, ...] = ()  # token counts M where torch_gemm's configs are timed against cuBLAS
    seed: int = 0


@dataclass
class Timing:
    model: str
    variant: str
    batch: int
    seq: int
    iterations: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput: float  # sequences per second at the mean latency
    setup_s: float = 0.0  # capture / compile time of this shape
    max_abs_diff_vs_hf: float | None = None  # start/end logits against hf_eager on the same inputs


@dataclass
class E2ETiming:
    variant: str
    questions: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    stage_p50_ms: dict[str, float] = field(default_factory=dict)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def time_device(step: Callable[[], Any], stream: Any, config: BenchConfig) -> list[float]:
    """Per-iteration latency in ms of `step` on `stream`, between CUDA events, after a warm-up."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        deadline = time.perf_counter() + config.warmup_s
        for count in range(1_000_000):
            step()
            if count >= 4 and time.perf_counter() > deadline:
                break
        stream.synchronize()
        times: list[float] = []
        began = time.perf_counter()
        while len(times) < config.max_iterations and (
            len(times) < config.min_iterations or time.perf_counter() - began < config.min_time_s
        ):
            start.record(stream)
            step()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
    return times


def summarize(model: str, variant: str, batch: int, seq: int, times: list[float], setup_s: float) -> Timing:
    mean = statistics.fmean(times)
    return Timing(
        model=model,
        variant=variant,
        batch=batch,
        seq=seq,
        iterations=len(times),
        mean_ms=mean,
        p50_ms=percentile(times, 50),
        p95_ms=percentile(times, 95),
        p99_ms=percentile(times, 99),
        throughput=batch * 1000.0 / mean,
        setup_s=setup_s,
    )


# -- models ------------------------------------------------------------------------------------


@dataclass
class BenchModel:
    name: str
    config: ModelConfig
    weights: dict[str, np.ndarray]  # canonical HF names, float32
    hf: Any  # transformers BertForQuestionAnswering on the GPU, benchmark precision


def load_bench_model(name: str, config: BenchConfig) -> BenchModel:
    """The named model: real weights for "shipped", seeded random weights for the BERT shapes."""
    import torch
    from realtime_qa.builder.checkpoint import canonical_names, load_checkpoint
    from transformers import BertConfig, BertForQuestionAnswering

    if name == "shipped":
        checkpoint = load_checkpoint(config.shipped_model, init_qa_head_seed=0)
        model_config, weights = checkpoint.config, checkpoint.weights
    else:
        model_config, weights = MODEL_SHAPES[name], {}
    hf_config = BertConfig(**model_config.to_dict())
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(config.seed)
    hf: Any = BertForQuestionAnswering(hf_config)
    if weights:
        missing, unexpected = hf.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
        if unexpected or [key for key in missing if not key.endswith("position_ids")]:
            raise RuntimeError(f"weights do not fit transformers' BERT: {missing[:3]} {unexpected[:3]}")
    else:
        weights = canonical_names({k: v.float().numpy() for k, v in hf.state_dict().items()})
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[config.precision]
    hf = hf.to("cuda", dtype).eval()
    return BenchModel(name, model_config, weights, hf)


def bench_meta(model: BenchModel, config: BenchConfig) -> EngineMeta:
    return EngineMeta(
        backend="torch",
        precision=config.precision,
        model_id=model.name,
        model_config=model.config,
        vocab_sha256="",
        source_sha256="benchmark",
        engine_file="model.safetensors",
        max_batch_size=max(config.batch_sizes),
        sequence_lengths=tuple(sorted(config.sequence_lengths)),
    )


def make_engine(model: BenchModel, config: BenchConfig, variant: str) -> Any:
    from realtime_qa.qacore.backends.torch_cuda import TorchCudaEngine, TorchEngineConfig

    engine_config = TorchEngineConfig(
        device="cuda:0",
        fused=variant != "torch_graphs",
        compile_mode=config.compile_mode if variant == "compiled" else None,
        blas_library="cublaslt" if variant == "fused_lt" else None,
        layer_fusion=variant in ("layer", "layer_spans"),
        splitk_gemm=variant in ("splitk", "splitk_spans", "attention", "attention_spans"),
        attention_kernel=variant in ("attention", "attention_spans"),
    )
    return TorchCudaEngine(bench_meta(model, config), model.weights, engine_config)


def random_inputs(batch: int, seq: int, vocab: int, rng: np.random.Generator) -> EngineInputs:
    input_ids = rng.integers(1000, vocab, size=(batch, seq), dtype=np.int32)
    input_ids[:, 0] = 101
    segment_ids = np.zeros((batch, seq), np.int32)
    segment_ids[:, seq // 4 :] = 1
    return EngineInputs(input_ids, segment_ids, np.ones((batch, seq), np.int32))


def hf_logits(hf: Any, inputs: EngineInputs) -> tuple[np.ndarray, np.ndarray]:
    import torch

    tensors = [torch.from_numpy(array).cuda() for array in (inputs.input_ids, inputs.segment_ids, inputs.input_mask)]
    with torch.inference_mode():
        out = hf(input_ids=tensors[0], token_type_ids=tensors[1], attention_mask=tensors[2])
    return out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()


def bench_model(model: BenchModel, config: BenchConfig, rng: np.random.Generator) -> list[Timing]:
    import torch

    engines = {variant: make_engine(model, config, variant) for variant in config.variants if variant != "hf_eager"}
    stream = torch.cuda.Stream()
    results: list[Timing] = []
    for seq in config.sequence_lengths:
        for batch in config.batch_sizes:
            inputs = random_inputs(batch, seq, model.config.vocab_size, rng)
            reference = hf_logits(model.hf, inputs)
            for variant in config.variants:
                if variant == "compiled" and (batch, seq) not in config.compile_shapes:
                    continue
                began = time.perf_counter()
                try:
                    if variant == "hf_eager":
                        step, diff = _hf_step(model.hf, inputs), None
                    else:
                        engine = engines[variant]
                        outputs = engine.infer(inputs)  # captures (and compiles) this shape
                        diff = max(
                            float(np.abs(outputs.start_logits - reference[0]).max()),
                            float(np.abs(outputs.end_logits - reference[1]).max()),
                        )
                        spans = variant in SPAN_VARIANTS
                        step = engine.graphed_shape(batch, seq, spans=spans).graph.replay
                    setup = time.perf_counter() - began
                    times = time_device(step, stream, config)
                except Exception:  # one failing variant (e.g. a compile error) must not end the run
                    log.exception("%s %s b=%d s=%d failed", model.name, variant, batch, seq)
                    continue
                timing = summarize(model.name, variant, batch, seq, times, setup)
                timing.max_abs_diff_vs_hf = diff
                results.append(timing)
                log.info(
                    "%s %s b=%d s=%d: p50 %.3f ms, %.0f seq/s (setup %.1f s, diff %s)",
                    model.name, variant, batch, seq, timing.p50_ms, timing.throughput, setup, diff,
                )  # fmt: skip
    for engine in engines.values():
        engine.close()
    return results


def _hf_step(hf: Any, inputs: EngineInputs) -> Callable[[], Any]:
    import torch

    tensors = [torch.from_numpy(array).cuda() for array in (inputs.input_ids, inputs.segment_ids, inputs.input_mask)]

    def step() -> Any:
        with torch.inference_mode():
            return hf(input_ids=tensors[0], token_type_ids=tensors[1], attention_mask=tensors[2])

    return step


# Tile sizes tried by --block-sweep: (linear_m, linear_n, linear_k, attention_q, attention_kv, warps, stages).
BLOCK_SWEEP = (
    (32, 64, 64, 64, 64, 4, 3),
    (16, 64, 64, 64, 64, 4, 3),
    (16, 32, 64, 64, 64, 4, 3),
    (32, 32, 64, 64, 64, 4, 3),
    (32, 64, 128, 64, 64, 4, 3),
    (64, 64, 64, 64, 64, 4, 3),
    (32, 64, 64, 128, 64, 4, 3),
    (32, 64, 64, 128, 128, 8, 3),
    (16, 64, 64, 32, 64, 4, 2),
    (32, 64, 64, 64, 32, 4, 4),
)


# Tiles tried by --attention-sweep: (query rows per program, keys per step, warps, stages).
ATTENTION_SWEEP = (
    (16, 128, 4, 2),
    (32, 128, 4, 2),
    (64, 128, 4, 2),
    (32, 64, 4, 2),
    (64, 64, 4, 2),
    (32, 128, 2, 2),
    (16, 64, 2, 2),
    (128, 128, 8, 2),
)


def attention_sweep(
    model: BenchModel, config: BenchConfig, batch: int, seq: int, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """The attention variant at one shape with each tile set of ATTENTION_SWEEP (a fresh engine each)."""
    from realtime_qa.qacore.backends import torch_kernels

    def install(sizes: tuple[int, ...]) -> None:
        tiles = torch_kernels.AttentionTiles(*sizes)
        torch_kernels.attention_tiles = lambda seq, head_dim: tiles

    original = torch_kernels.attention_tiles
    try:
        return _sweep(model, config, batch, seq, rng, "attention", "tiles", ATTENTION_SWEEP, install)
    finally:
        torch_kernels.attention_tiles = original


def _sweep(
    model: BenchModel,
    config: BenchConfig,
    batch: int,
    seq: int,
    rng: np.random.Generator,
    variant: str,
    label: str,
    settings: Sequence[tuple[int, ...]],
    install: Callable[[tuple[int, ...]], None],
) -> list[dict[str, Any]]:
    """`variant` at one shape once per entry of `settings`, each put in place by `install` before a fresh engine
    is made; rows {label: entry, p50_ms, p99_ms} (an entry whose engine fails is logged and left out)."""
    inputs = random_inputs(batch, seq, model.config.vocab_size, rng)
    stream = __import__("torch").cuda.Stream()
    rows: list[dict[str, Any]] = []
    for sizes in settings:
        install(sizes)
        try:
            engine = make_engine(model, config, variant)
            engine.infer(inputs)
            times = time_device(engine.graphed_shape(batch, seq).graph.replay, stream, config)
            engine.close()
        except Exception:
            log.exception("%s sweep %s failed", variant, sizes)
            continue
        timing = summarize(model.name, variant, batch, seq, times, 0.0)
        rows.append({label: sizes, "p50_ms": timing.p50_ms, "p99_ms": timing.p99_ms})
        log.info("%s %s: p50 %.4f ms", label, sizes, timing.p50_ms)
    return rows


def block_sweep(model: BenchModel, config: BenchConfig, batch: int, seq: int, rng: np.random.Generator) -> list[Any]:
    """The layer variant at one shape with each tile-size set of BLOCK_SWEEP (a fresh engine each)."""
    from realtime_qa.qacore.backends import torch_layer_kernels

    def install(sizes: tuple[int, ...]) -> None:
        blocks = torch_layer_kernels.Blocks(*sizes)
        torch_layer_kernels.Blocks.for_rows = classmethod(lambda cls, tokens: blocks)  # type: ignore[method-assign,assignment]

    original = torch_layer_kernels.Blocks.for_rows
    try:
        return _sweep(model, config, batch, seq, rng, "layer", "blocks", BLOCK_SWEEP, install)
    finally:
        torch_layer_kernels.Blocks.for_rows = original  # type: ignore[method-assign]


def kernel_profile(
    model: BenchModel, config: BenchConfig, batch: int, seq: int, rng: np.random.Generator, variant: str = "fused"
) -> str:
    """One variant's CUDA kernels at one shape (eager, so each kernel shows), by total device time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    engine = make_engine(model, config, variant)
    inputs = random_inputs(batch, seq, model.config.vocab_size, rng)
    tensors = [torch.from_numpy(a).cuda() for a in (inputs.input_ids, inputs.segment_ids, inputs.input_mask)]
    with torch.inference_mode():
        for _ in range(3):
            engine.module(*tensors)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                engine.module(*tensors)
            torch.cuda.synchronize()
    engine.close()
    title = f"kernels of {variant} {model.name} b={batch} s={seq} (5 eager forwards)"
    return title + "\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)


# -- end to end ----------------------------------------------------------------------------------


class HFEagerEngine(Engine):
    """The baseline as an Engine: transformers' BertForQuestionAnswering, eager, on the GPU."""

    def __init__(self, meta: EngineMeta, hf: Any) -> None:
        super().__init__(meta)
        self.hf = hf

    def infer(self, inputs: EngineInputs) -> EngineOutputs:
        self.check_inputs(inputs)
        start, end = hf_logits(self.hf, inputs)
        return EngineOutputs(start, end)


class LogitsOnly(Engine):
    """An engine without its device span search, so callers decode its logits on the CPU."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine.meta)
        self.engine = engine

    def infer(self, inputs: EngineInputs) -> EngineOutputs:
        return self.engine.infer(inputs)

    def close(self) -> None:
        self.engine.close()


def bench_e2e(model: BenchModel, config: BenchConfig) -> list[E2ETiming]:
    """One question at a time through QuestionAnswerer: tokenize + infer + decode, per engine."""
    from realtime_qa.qacore.answerer import QuestionAnswerer
    from realtime_qa.qacore.features import Featurizer
    from realtime_qa.qacore.squad import read_dataset
    from realtime_qa.qacore.tokenization import load_tokenizer

    assert config.e2e_squad is not None
    dataset = read_dataset(config.e2e_squad)
    items = [(question.question, paragraph.context) for paragraph, question in dataset.questions()]
    items = items[: config.e2e_questions]
    featurizer = Featurizer(load_tokenizer(config.shipped_model))
    rows = []
    for variant in config.variants:
        if variant in ("compiled", "fused_lt"):
            continue
        engine: Engine
        if variant == "hf_eager":
            engine = HFEagerEngine(bench_meta(model, config), model.hf)
        elif variant in SPAN_VARIANTS:  # the answerer finds the device span search and uses it
            engine = make_engine(model, config, variant)
        else:  # logits decoded on the CPU, as before
            engine = LogitsOnly(make_engine(model, config, variant))
        answerer = QuestionAnswerer(engine, featurizer)
        for question, passage in items[:20]:
            answerer.answer(question, passage)
        latencies: list[float] = []
        stages: dict[str, list[float]] = {stage: [] for stage in IN_PROCESS_STAGES}
        for question, passage in items:
            began = time.perf_counter_ns()
            result = answerer.answer(question, passage)
            latencies.append((time.perf_counter_ns() - began) / 1e6)
            for stage, values in stages.items():
                values.append(result.timings.stage_ns(stage) / 1e6)
        rows.append(
            E2ETiming(
                variant=variant,
                questions=len(items),
                p50_ms=percentile(latencies, 50),
                p95_ms=percentile(latencies, 95),
                p99_ms=percentile(latencies, 99),
                mean_ms=statistics.fmean(latencies),
                stage_p50_ms={stage: percentile(values, 50) for stage, values in stages.items()},
            )
        )
        engine.close()
    return rows


# -- report -------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "multiprocessors": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "transformers": __import__("transformers").__version__,
        "triton": __import__("triton").__version__,
    }


def table(results: list[Timing]) -> str:
    """One row per (model, seq, batch): p50 of each variant; the product's p99, speed-ups and seq/s."""
    by_key: dict[tuple[str, int, int], dict[str, Timing]] = {}
    for timing in results:
        by_key.setdefault((timing.model, timing.seq, timing.batch), {})[timing.variant] = timing
    variants = [variant for variant in VARIANTS if any(variant in row for row in by_key.values())]
    product = PRODUCT if PRODUCT in variants else "fused"
    header = ["model", "seq", "batch", *[f"{v} p50 ms" for v in variants]]
    header += [f"{product} p99 ms", "vs eager", f"{product} seq/s"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for (model, seq, batch), row in by_key.items():
        cells = [model, str(seq), str(batch)]
        cells += [f"{row[v].p50_ms:.3f}" if v in row else "" for v in variants]
        best, eager = row.get(product), row.get("hf_eager")
        cells.append(f"{best.p99_ms:.3f}" if best else "")
        cells.append(f"{eager.p50_ms / best.p50_ms:.1f}x" if best and eager else "")
        cells.append(f"{best.throughput:,.0f}" if best else "")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def goal_lines(results: list[Timing]) -> list[str]:
    lines = []
    for (model, batch, seq), (metric, target) in GOALS.items():
        for variant in ("fused", "fused_lt", "compiled", "fused_spans", "layer", "layer_spans", *VARIANTS[-4:]):
            found = [t for t in results if (t.model, t.batch, t.seq, t.variant) == (model, batch, seq, variant)]
            if not found:
                continue
            value = getattr(found[0], metric)
            met = value <= target if metric == "p50_ms" else value >= target
            unit = "ms" if metric == "p50_ms" else "seq/s"
            lines.append(
                f"goal {model} b={batch} s={seq} {variant}: {value:,.3f} {unit} "
                f"({'<=' if metric == 'p50_ms' else '>='} {target:,} {unit}): {'MET' if met else 'MISSED'}"
            )
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The results file: environment, exact command, the table with its baselines, e2e rows, goals."""
    env = report["environment"]
    lines = [
        f"# GPU engine benchmark: {env['gpu']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"PyTorch {env['torch']} (CUDA {env['cuda']}), Triton {env['triton']}, transformers {env['transformers']}, "
        f"Python {env['python']}. Precision {report['config']['precision']}. Engine-only latency between CUDA "
        "events (random token ids, full-length windows), warm-up first; p50 per variant, same weights and "
        "inputs for every variant of a row, measured one right after another.",
        "",
        report["table"],
        "",
    ]
    if report.get("e2e"):
        lines += [f"End to end, one SQuAD dev question at a time ({' + '.join(IN_PROCESS_STAGES)}), shipped model:", ""]
        lines += [
            "variant | p50 ms | p95 ms | p99 ms | " + " | ".join(f"{stage} p50" for stage in IN_PROCESS_STAGES),
            "---|---|---|---" + "|---" * len(IN_PROCESS_STAGES),
        ]
        for row in report["e2e"]:
            stages = row["stage_p50_ms"]
            lines.append(
                f"{row['variant']} | {row['p50_ms']:.3f} | {row['p95_ms']:.3f} | {row['p99_ms']:.3f} | "
                + " | ".join(f"{stages[stage]:.3f}" for stage in IN_PROCESS_STAGES)
            )
        lines.append("")
    lines += ["Goals:", ""] + [f"- {line}" for line in report["goals"]] + [""]
    return "\n".join(lines)


def run(config: BenchConfig, out: Path | None, argv: Sequence[str]) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("qa-bench engine: needs a CUDA GPU (PyTorch sees none)")
    rng = np.random.default_rng(config.seed)
    report: dict[str, Any] = {
        "command": "qa-bench engine " + " ".join(argv),
        "environment": environment(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "results": [],
        "e2e": [],
    }
    if config.gemm_sweep:
        from realtime_qa.benchmarks import gemm_sweep
        from realtime_qa.qacore.backends import torch_gemm

        sweep = gemm_sweep.sweep(gemm_sweep.model_shapes(config.models, config.shipped_model), config.gemm_sweep)
        report["gemm_sweep"] = sweep
        torch_gemm.TABLE = gemm_sweep.winners_table(sweep)  # the splitk variants of this run use the winners
        report["gemm_table"] = gemm_sweep.table_json(torch_gemm.TABLE)
        print(gemm_sweep.table_literal(torch_gemm.TABLE), flush=True)
        if out is not None:
            out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for name in config.models:
        began = time.perf_counter()
        model = load_bench_model(name, config)
        report["results"] += [asdict(t) for t in bench_model(model, config, rng)]
        for batch, seq in config.profile_shapes:
            for variant in ("fused", *(v for v in ("layer", "splitk", "attention") if v in config.variants)):
                try:
                    profiled = kernel_profile(model, config, batch, seq, rng, variant)
                    report.setdefault("kernel_profiles", []).append(profiled)
                    print(profiled)
                except Exception:
                    log.exception("kernel profile of %s failed", name)
        for batch, seq in config.block_sweep:
            report.setdefault("block_sweep", []).append(
                {"model": name, "batch": batch, "seq": seq, "rows": block_sweep(model, config, batch, seq, rng)}
            )
        for batch, seq in config.attention_sweep:
            rows = attention_sweep(model, config, batch, seq, rng)
            report.setdefault("attention_sweep", []).append({"model": name, "batch": batch, "seq": seq, "rows": rows})
            print(f"attention tiles, {name} b={batch} s={seq}: " + "; ".join(
                f"{row['tiles']} {row['p50_ms']:.4f} ms" for row in rows), flush=True)  # fmt: skip
        if name == "shipped" and config.e2e_squad is not None:
            report["e2e"] = [asdict(t) for t in bench_e2e(model, config)]
        log.info("%s done in %.1f s", name, time.perf_counter() - began)
        del model
        torch.cuda.empty_cache()
        if out is not None:  # partial results survive a run cut short
            out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    results = [Timing(**raw) for raw in report["results"]]
    report["table"] = table(results)
    report["goals"] = goal_lines(results)
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(report["table"])
    for row in report["e2e"]:
        stages = ", ".join(f"{k} {v:.3f}" for k, v in row["stage_p50_ms"].items())
        print(f"e2e {row['variant']}: p50 {row['p50_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms ({stages})")
    print("\n".join(report["goals"]))
    return report


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    shapes = []
    for part in text.split(","):
        batch, _, seq = part.partition("x")
        shapes.append((_ints(batch)[0], _ints(seq)[0]))
    return tuple(shapes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `engine` subcommand's options (benchmarks.cli registers the subcommand with these)."""
    parser.add_argument(
        "--models", default="shipped,bert-base,bert-large", help="comma-separated: shipped, bert-base, bert-large"
    )
    parser.add_argument("--batch-sizes", type=_ints, default=DEFAULT_BATCH_SIZES)
    parser.add_argument("--seq-lengths", type=_ints, default=DEFAULT_SEQUENCE_LENGTHS)
    parser.add_argument(
        "--variants", default="hf_eager,torch_graphs,fused", help=f"comma-separated of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--precision", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--min-iterations", type=int, default=30)
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds timed per row at least")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode for the 'compiled' variant")
    parser.add_argument("--compile-shapes", type=_shapes, default=((1, 128),), help="BxS,... timed with --compile-mode")
    parser.add_argument("--shipped-model", type=Path, default=SHIPPED_MODEL_DIR)
    parser.add_argument("--e2e-squad", type=Path, default=None, help="SQuAD dev JSON(.gz): add end-to-end rows")
    parser.add_argument("--e2e-questions", type=int, default=300)
    parser.add_argument("--profile-shapes", type=_shapes, default=(), help="BxS,... list the fused kernels there")
    parser.add_argument("--block-sweep", type=_shapes, default=(), help="BxS,... sweep the layer kernels' tiles there")
    parser.add_argument(
        "--attention-sweep", type=_shapes, default=(), help="BxS,... sweep the attention kernel's tiles there"
    )
    parser.add_argument(
        "--gemm-sweep", type=_ints, default=(), help="M,...: time torch_gemm's configs vs cuBLAS at these token counts"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    models = tuple(name for name in args.models.split(",") if name)
    unknown = [name for name in models if name != "shipped" and name not in MODEL_SHAPES]
    variants = tuple(name for name in args.variants.split(",") if name)
    bad_variants = [name for name in variants if name not in VARIANTS]
    if unknown or bad_variants:
        raise SystemExit(f"qa-bench engine: unknown model or variant: {', '.join(unknown + bad_variants)}")
    if args.compile_mode and "compiled" not in variants:
        variants = (*variants, "compiled")
    if "compiled" in variants and not args.compile_mode:
        raise SystemExit("qa-bench engine: the compiled variant needs --compile-mode")
    return BenchConfig(
        models=models,
        batch_sizes=args.batch_sizes,
        sequence_lengths=args.seq_lengths,
        variants=variants,
        precision=args.precision,
        min_iterations=args.min_iterations,
        min_time_s=args.min_time,
        compile_mode=args.compile_mode,
        compile_shapes=args.compile_shapes,
        shipped_model=args.shipped_model,
        e2e_squad=args.e2e_squad,
        e2e_questions=args.e2e_questions,
        profile_shapes=args.profile_shapes,
        block_sweep=args.block_sweep,
        attention_sweep=args.attention_sweep,
        gemm_sweep=args.gemm_sweep,
    )


def run_from_args(args: argparse.Namespace, argv: Sequence[str]) -> int:
    run(config_from_args(args), args.out, argv)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="qa-bench engine", description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_from_args(parser.parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
