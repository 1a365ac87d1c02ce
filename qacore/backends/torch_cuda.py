"""PyTorch engine (backend "torch"): the BERT QA network on a CUDA GPU in fp16/bf16, replayed from CUDA graphs.

The engine directory holds meta.json and the HF-named weights (`model.safetensors`, written by
`qa-build --backend torch`). At load time the weights become a `FusedBertForQA` (one QKV GEMM,
SDPA attention, Triton bias+GELU and residual+LayerNorm kernels) or, with `fused=False`, the training
network `BertForQA` itself. With `layer_fusion` the fused module runs four Triton kernels per encoder
layer (`torch_layer_kernels`) instead (an experiment: correct, slower on the H200). With `splitk_gemm` (the
default) the encoder's GEMMs at small token counts are split-K Triton GEMMs (`torch_gemm`), and there (with
`attention_kernel`, the default) attention is one Triton kernel per layer and the QA head is folded into the last
LayerNorm kernel (`torch_kernels.attention`). Each padded shape
(batch bucket x sequence bucket) is captured once into a CUDA graph with static input and output buffers; `infer` copies
the batch into pinned host memory, into the static inputs, replays the graph and copies the logits back:
two copies and one graph launch per call. Batches are padded up to the bucket and the logits sliced back, so callers
see the shape they passed, exactly as with the other backends.

Span search (`infer_spans`, the optional `Engine` capability): a second graph per shape runs
`torch_spans.top_spans` right after the encoder, so a call copies back `1 + 3k` floats per window (the
null logit and the k best (start, end, logit) triples) instead of two logit rows. `launch_spans` queues the same
copies and replay and returns at once, so the service's event loop polls the device instead of waiting on a thread
(two thread hops less per batch).

`device="cpu"` (float32, no graphs) exists for tests on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from realtime_qa.qacore.engine import Engine, EngineMeta, EngineOutputs, EngineSpans, PendingSpans
from realtime_qa.qacore.errors import EngineError
from realtime_qa.qacore.factory import EngineOptions
from realtime_qa.qacore.features import EngineInputs

log = logging.getLogger(__name__)

SEQ_BUCKET_STEP = 64


@dataclass(frozen=True)
class TorchEngineConfig:
    """How the PyTorch engine runs; what the engine *is* (model, precision, shapes) lives in meta.json."""

    device: str = "cuda:0"
    precision: str | None = None  # "fp16" | "bf16" | "fp32"; None = the precision in meta.json
    cuda_graphs: bool = True
    blocking_sync: bool = False  # wait for results sleeping on a blocking-sync event instead of spinning
    fused: bool = True  # FusedBertForQA; False runs the training network BertForQA unchanged
    use_triton: bool = True  # the fused path's Triton kernels (else plain torch ops)
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"; None = eager
    # cuBLAS front end for the GEMMs: "cublas" | "cublaslt" | None (PyTorch's default). A captured graph
    # keeps the kernels chosen at capture, so this only has to hold while capturing.
    blas_library: str | None = None
    # Four Triton kernels per layer (torch_layer_kernels) where the shape allows. Off by default: correct
    # (SQuAD F1 equal) but slower than cuBLAS + SDPA on the H200 (benchmarks/results/engine_h200.md).
    layer_fusion: bool = False
    # Split-K Triton GEMMs (torch_gemm) for the encoder projections whose shape and token count its
    # measured table lists (batch 1-8 at sequence 128, batch 1 at 384 on the H200), cuBLAS for the rest;
    # token counts the table does not cover run exactly the previous path. On by default: faster at batch 1,
    # equal elsewhere, same SQuAD F1 (benchmarks/results/engine_h200_splitk.md). Not with compile_mode, and
    # only on compute capability 9.0 and newer (programmatic dependent launch; the table was measured on Hopper).
    splitk_gemm: bool = True
    # Where the split-K path runs: attention by one Triton kernel straight from the QKV GEMM's output and
    # the int input mask (instead of an additive mask tensor and cuDNN's SDPA), launched with programmatic
    # dependent launch like its neighbours, and the QA head inside the last LayerNorm kernel
    # (benchmarks/results/engine_h200_attention.md). False: the split-K engine as before.
    attention_kernel: bool = True
    # Device span search: spans kept per window (twice the default n-best: distinct token spans may share a
    # character span) and the longest answer, in tokens, it searches.
    span_top_k: int = 40
    span_band: int = 32

    def __post_init__(self) -> None:
        if self.precision not in (None, "fp16", "bf16", "fp32"):
            raise EngineError(f"torch engine precision must be fp16, bf16 or fp32, got {self.precision!r}")
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise EngineError(f"CUDA graphs need a CUDA device, got {self.device!r}")
        if self.blas_library not in (None, "cublas", "cublaslt"):
            raise EngineError(f"blas_library must be cublas or cublaslt, got {self.blas_library!r}")
        if not (1 <= self.span_top_k <= 256 and 1 <= self.span_band <= 256):
            raise EngineError("span_top_k and span_band must be in [1, 256]")


@contextlib.contextmanager
def preferred_blas(library: str | None) -> Iterator[None]:
    """Route PyTorch's GEMMs through `library` for the duration (process-wide; restored afterwards)."""
    if library is None:
        yield
        return
    import torch

    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below `max_batch`, then `max_batch`: a batch pads to at most twice its size."""
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def sequence_buckets(lengths: tuple[int, ...]) -> tuple[int, ...]:
    """The engine's lengths plus every multiple of 64 below the longest: short batches stay cheap."""
    longest = max(lengths)
    return tuple(sorted(set(lengths) | set(range(SEQ_BUCKET_STEP, longest, SEQ_BUCKET_STEP))))


def bucket(value: int, buckets: tuple[int, ...]) -> int:
    for size in buckets:
        if size >= value:
            return size
    raise EngineError(f"{value} exceeds the largest bucket {buckets[-1]}")


class _GraphedShape:
    """One captured forward: static device inputs [3, B, S] int32 and output [B, S, 2] float32; with
    `spans` = (k, band), a fourth input plane of span flags and output [B, 1 + 3k] (`torch_spans`)."""

    def __init__(
        self,
        module: Any,
        batch: int,
        seq: int,
        device: Any,
        pool: Any,
        stream: Any,
        spans: tuple[int, int] | None = None,
    ) -> None:
        import torch

        self.batch, self.seq, self.spans = batch, seq, spans
        planes = 3 if spans is None else 4
        self.host_inputs = torch.zeros((planes, batch, seq), dtype=torch.int32, pin_memory=True)
        self.inputs = torch.zeros((planes, batch, seq), dtype=torch.int32, device=device)
        self.inputs[0] = 101  # [CLS]-like ids and a full mask: warm-up runs on valid values
        self.inputs[2] = 1
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        side.wait_stream(stream)
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # allocator, cuBLAS handles and autotuning settle before capture
                self._forward(module)
        stream.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph, pool=pool, stream=side):
            self.outputs = self._forward(module)
        stream.wait_stream(side)
        self.host_outputs = torch.empty(self.outputs.shape, dtype=torch.float32, pin_memory=True)

    def _forward(self, module: Any) -> Any:
        logits = module(self.inputs[0], self.inputs[1], self.inputs[2])
        if self.spans is None:
            return logits
        from realtime_qa.qacore.backends.torch_spans import top_spans

        return top_spans(logits, self.inputs[3], *self.spans)

    def launch(self, inputs: EngineInputs, stream: Any, span_flags: np.ndarray | None = None) -> None:
        """Copy `inputs` (smaller than or equal to this shape) in, replay and copy the outputs back, all queued on
        `stream`; nothing waits. With spans, `span_flags` is the fourth input plane."""
        host = self.host_inputs.numpy()
        rows, width = inputs.batch_size, inputs.seq_len
        host[:, rows:] = 0  # padding rows and columns: pad id 0, segment 0, mask 0, no span flags
        host[:, :rows, width:] = 0
        host[0, :rows, :width] = inputs.input_ids
        host[1, :rows, :width] = inputs.segment_ids
        host[2, :rows, :width] = inputs.input_mask
        if span_flags is not None:
            host[3, :rows, :width] = span_flags
        import torch

        with torch.cuda.stream(stream):  # copies and replay on the engine's stream
            self.inputs.copy_(self.host_inputs, non_blocking=True)
            self.graph.replay()
            self.host_outputs.copy_(self.outputs, non_blocking=True)

    def read(self, rows: int, width: int) -> np.ndarray:
        """The outputs of the last launch (after it finished): logits [rows, width, 2], or the span search's
        [rows, 1 + 3k]; a copy, since the next launch reuses the buffer."""
        if self.spans is not None:
            return np.array(self.host_outputs.numpy()[:rows])
        return np.array(self.host_outputs.numpy()[:rows, :width])

    def run(
        self, inputs: EngineInputs, stream: Any, span_flags: np.ndarray | None = None, done: Any = None
    ) -> np.ndarray:
        """`launch`, wait, `read`. `done`: a blocking-sync CUDA event to wait on (None: spin on the stream)."""
        self.launch(inputs, stream, span_flags)
        if done is not None:
            done.record(stream)
            done.synchronize()  # the thread sleeps until the driver signals the event
        else:
            stream.synchronize()  # spins
        return self.read(inputs.batch_size, inputs.seq_len)


class _LaunchedSpans(PendingSpans):
    """One span search replayed from its graph, finished when `event` is (recorded after the copy back). Holds the
    engine's lock from the launch until `result()`, so no other call reuses the graph's buffers meanwhile."""

    def __init__(self, graphed: _GraphedShape, event: Any, rows: int, top_k: int, lock: threading.Lock) -> None:
        self._graphed, self._event, self._rows, self._top_k = graphed, event, rows, top_k
        self._lock: threading.Lock | None = lock

    def ready(self) -> bool:
        return bool(self._event.query())

    def result(self) -> EngineSpans:
        lock = self._lock
        if lock is None:
            raise EngineError("the span search's result was already taken")
        self._lock = None
        try:
            self._event.synchronize()
            found = self._graphed.read(self._rows, 0)
        finally:
            lock.release()
        return spans_from_device(found, self._top_k)


class TorchCudaEngine(Engine):
    """The BERT QA network in PyTorch on one device; not thread-safe (one engine per executor thread)."""

    def __init__(self, meta: EngineMeta, weights: Mapping[str, np.ndarray], config: TorchEngineConfig) -> None:
        super().__init__(meta)
        import torch

        self.config = config
        precision = config.precision or meta.precision
        if precision not in ("fp16", "bf16", "fp32"):
            raise EngineError(f"the torch backend runs fp16, bf16 or fp32, not {precision!r}")
        self.precision = precision
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise EngineError("the torch engine needs a CUDA GPU, and PyTorch sees none here")
            if (self.device.index or 0) >= torch.cuda.device_count():
                raise EngineError(f"CUDA device {self.device} does not exist ({torch.cuda.device_count()} visible)")
        elif precision != "fp32":
            raise EngineError(f"on {self.device} the torch engine runs fp32 only, not {precision}")
        self.module = self._make_module(weights)
        self.batch_buckets = batch_buckets(meta.max_batch_size)
        self.seq_buckets = sequence_buckets(meta.sequence_lengths)
        self._graphs: dict[tuple[int, int, bool], _GraphedShape] = {}
        self._lock = threading.Lock()
        if self.device.type == "cuda":
            self.stream: Any = torch.cuda.Stream(self.device)
            self._done: Any = torch.cuda.Event(blocking=True) if config.blocking_sync else None
            self._launched: Any = torch.cuda.Event()  # polled (`launch_spans`): query() never waits
            self._pool = torch.cuda.graph_pool_handle() if config.cuda_graphs else None

    def _make_module(self, weights: Mapping[str, np.ndarray]) -> Any:
        import torch
        from realtime_qa.qacore.backends.torch_fused import FusedBertForQA, torch_dtype
        from realtime_qa.qacore.backends.torch_network import BertForQA

        dtype = torch_dtype(self.precision)
        config = self.meta.model_config
        as_float32 = {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}
        module: Any
        try:
            if self.config.fused:
                use_triton = self.config.use_triton and self.config.compile_mode is None
                module = FusedBertForQA.from_weights(
                    config,
                    as_float32,
                    use_triton=use_triton,
                    layer_fusion=self.config.layer_fusion,
                    splitk_gemm=self.config.splitk_gemm and self.config.compile_mode is None,
                    attention_kernel=self.config.attention_kernel,
                )
            else:
                network = BertForQA(config)
                network.load_weights(as_float32)
                module = _StackedLogits(network)
        except KeyError as exc:
            raise EngineError(f"engine weights do not fit the model: {exc}") from None
        module = module.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        if self.config.compile_mode is not None:
            module = torch.compile(module, mode=self.config.compile_mode, dynamic=False, fullgraph=True)
        return module

    # -- inference ------------------------------------------------------------------------------

    def infer(self, inputs: EngineInputs) -> EngineOutputs:
        self.check_inputs(inputs)
        shape = (bucket(inputs.batch_size, self.batch_buckets), bucket(inputs.seq_len, self.seq_buckets))
        if self.device.type == "cuda" and self.config.cuda_graphs:
            with self._lock:
                logits = self._graphed(shape).run(inputs, self.stream, done=self._done)
        else:
            logits = self._eager(inputs)
        return EngineOutputs(np.ascontiguousarray(logits[..., 0]), np.ascontiguousarray(logits[..., 1]))

    def span_search_limits(self) -> tuple[int, int]:
        return self.config.span_top_k, self.config.span_band

    def infer_spans(
        self, inputs: EngineInputs, may_start: np.ndarray, may_end: np.ndarray, max_answer_length: int
    ) -> EngineSpans:
        flags, shape = self._span_call(inputs, may_start, may_end, max_answer_length)
        if self.device.type == "cuda" and self.config.cuda_graphs:
            with self._lock:
                found = self._graphed(shape, spans=True).run(inputs, self.stream, flags, self._done)
        else:
            found = self._eager_spans(inputs, flags)
        return spans_from_device(found, self.config.span_top_k)

    def launches_spans(self) -> bool:
        """With CUDA graphs and spinning waits: the caller polls (`--gpu-sync block` keeps a thread that sleeps)."""
        return self.device.type == "cuda" and self.config.cuda_graphs and not self.config.blocking_sync

    def launch_spans(
        self, inputs: EngineInputs, may_start: np.ndarray, may_end: np.ndarray, max_answer_length: int
    ) -> PendingSpans:
        if not self.launches_spans():
            return super().launch_spans(inputs, may_start, may_end, max_answer_length)
        flags, shape = self._span_call(inputs, may_start, may_end, max_answer_length)
        self._lock.acquire()
        try:
            graphed = self._graphed(shape, spans=True)
            graphed.launch(inputs, self.stream, flags)
            self._launched.record(self.stream)
        except BaseException:
            self._lock.release()
            raise
        return _LaunchedSpans(graphed, self._launched, inputs.batch_size, self.config.span_top_k, self._lock)

    def _span_call(
        self, inputs: EngineInputs, may_start: np.ndarray, may_end: np.ndarray, max_answer_length: int
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """The checked call's span flags and padded shape."""
        self.check_inputs(inputs)
        if may_start.shape != inputs.input_ids.shape or may_end.shape != inputs.input_ids.shape:
            raise EngineError(f"span masks must have the inputs' shape {inputs.input_ids.shape}")
        if not 1 <= max_answer_length <= self.config.span_band:
            raise EngineError(f"max_answer_length {max_answer_length} is outside [1, {self.config.span_band}]")
        flags = span_flags(may_start, may_end, max_answer_length)
        return flags, (bucket(inputs.batch_size, self.batch_buckets), bucket(inputs.seq_len, self.seq_buckets))

    def graphed_shape(self, batch: int, seq: int, spans: bool = False) -> _GraphedShape:
        """The captured graph that serves (batch, seq), captured now if it is new (benchmarks time its replay)."""
        if not (self.device.type == "cuda" and self.config.cuda_graphs):
            raise EngineError("this engine runs without CUDA graphs")
        self.check_inputs(EngineInputs(*(np.zeros((batch, seq), np.int32) for _ in range(3))))
        with self._lock:
            return self._graphed((bucket(batch, self.batch_buckets), bucket(seq, self.seq_buckets)), spans)

    def _graphed(self, shape: tuple[int, int], spans: bool = False) -> _GraphedShape:
        import torch

        graphed = self._graphs.get((*shape, spans))
        if graphed is None:
            log.info("capturing a CUDA graph for batch %d x sequence %d (span search: %s)", *shape, spans)
            limits = (self.config.span_top_k, self.config.span_band) if spans else None
            with torch.cuda.device(self.device), preferred_blas(self.config.blas_library):
                graphed = _GraphedShape(self.module, *shape, self.device, self._pool, self.stream, limits)
            self._graphs[(*shape, spans)] = graphed
        return graphed

    def _eager_spans(self, inputs: EngineInputs, flags: np.ndarray) -> np.ndarray:
        import torch
        from realtime_qa.qacore.backends.torch_spans import top_spans, top_spans_reference

        logits = torch.from_numpy(self._eager(inputs)).to(self.device)
        device_flags = torch.from_numpy(flags).to(self.device)
        with torch.inference_mode():
            if self.device.type == "cuda" and self.config.use_triton:
                found = top_spans(logits.contiguous(), device_flags, self.config.span_top_k, self.config.span_band)
            else:
                found = top_spans_reference(logits, device_flags, self.config.span_top_k)
        return found.cpu().numpy()

    def _eager(self, inputs: EngineInputs) -> np.ndarray:
        import torch

        stacked = np.stack([inputs.input_ids, inputs.segment_ids, inputs.input_mask]).astype(np.int32, copy=False)
        with torch.inference_mode(), preferred_blas(self.config.blas_library):
            if self.device.type == "cuda":
                with torch.cuda.stream(self.stream):
                    device_inputs = torch.from_numpy(stacked).pin_memory().to(self.device, non_blocking=True)
                    logits = self.module(device_inputs[0], device_inputs[1], device_inputs[2]).cpu()
            else:
                tensors = torch.from_numpy(stacked)
                logits = self.module(tensors[0], tensors[1], tensors[2])
        return logits.numpy()

    def warmup(self) -> None:
        """Capture (or run once) every bucketed shape, so no request pays for a capture."""
        for batch in self.batch_buckets:
            for seq in self.seq_buckets:
                shape = (batch, seq)
                self.infer(EngineInputs(*(np.ones(shape, np.int32) for _ in range(3))))

    def close(self) -> None:
        self._graphs.clear()
        self.module = None


def span_flags(may_start: np.ndarray, may_end: np.ndarray, max_answer_length: int) -> np.ndarray:
    """The span search's int32 flag plane (`torch_spans`): bit 0 start, bit 1 end, column 0 the length."""
    flags = may_start.astype(np.int32) + 2 * may_end.astype(np.int32)
    flags[:, 0] = max_answer_length
    return flags


def spans_from_device(found: np.ndarray, top_k: int) -> EngineSpans:
    """`EngineSpans` from the span search's float32 [B, 1 + 3k] rows."""
    triples = found[:, 1 : 1 + 3 * top_k].reshape(found.shape[0], top_k, 3)
    empty = triples[:, :, 0] < 0
    return EngineSpans(
        starts=triples[:, :, 0].astype(np.int32),
        ends=triples[:, :, 1].astype(np.int32),
        logits=np.where(empty, -np.inf, triples[:, :, 2]).astype(np.float32),
        null_logits=np.ascontiguousarray(found[:, 0]),
    )


def _StackedLogits(network: Any) -> Any:  # noqa: N802 - builds a module, reads like a class
    """`BertForQA` returning one [B, S, 2] float32 tensor, as the fused network does (graphs need one output)."""
    import torch

    class StackedLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
            start, end = self.network(input_ids, segment_ids, input_mask)
            return torch.stack((start, end), dim=-1)

    return StackedLogits()


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """The engine's HF-named weights (one safetensors file, or a sharded index written by hf_export)."""
    from safetensors.numpy import load_file

    files = [path]
    if path.name.endswith(".index.json"):
        import json

        index = json.loads(path.read_text(encoding="utf-8"))
        files = [path.parent / name for name in sorted(set(index["weight_map"].values()))]
    weights: dict[str, np.ndarray] = {}
    try:
        for file in files:
            weights.update(load_file(str(file)))
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot read engine weights {path}: {exc}") from None
    return weights


def open_engine(engine_dir: Path, meta: EngineMeta, options: EngineOptions) -> TorchCudaEngine:
    """The backend entry point `qacore.factory.load_engine` calls."""
    config = TorchEngineConfig(
        device=f"cuda:{options.device_id}",
        cuda_graphs=options.use_cuda_graphs,
        blocking_sync=options.gpu_blocking_sync,
    )
    return TorchCudaEngine(meta, load_weights(engine_dir / meta.engine_file), config)
