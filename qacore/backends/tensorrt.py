"""TensorRT engine (backend "tensorrt"): a serialized plan run through TensorRT 10/11's tensor API.

    deserialize plan -> one execution context per stream -> for each batch:
      pick the smallest optimization profile whose [batch, seq] range holds it
      -> pinned host inputs --async copy--> device inputs -> set_input_shape / set_tensor_address
      -> execute_async_v3 (or replay a CUDA graph captured for this exact shape)
      -> device logits --async copy--> pinned host -> synchronize the stream

CUDA memory, streams, copies and graphs go through cuda-python (`cuda.bindings.runtime`); pycuda is
never needed. A TensorRT profile may be active in one execution context at a time, so context k
owns profiles [k*P, (k+1)*P) of a plan whose P profile shapes were replicated once per stream; a plan
built with one copy gets one context. Contexts are handed out through a queue, so `infer` may be
called from as many threads as there are contexts.

Honesty note: no machine this project runs on has libnvinfer (TensorRT's runtime), and TensorRT-RTX
refuses the H100 (compute capability 9.0), so this module has never run a plan. `CudaBuffers` (the
cuda-python part: pinned memory, copies, graphs) is exercised by tests on the GPU machine; the
TensorRT calls follow the TensorRT 10 Python API. docs/gpu.md says what ran where.
"""

from __future__ import annotations

import ctypes
import logging
import queue
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from realtime_qa.qacore.engine import Engine, EngineMeta, EngineOutputs
from realtime_qa.qacore.errors import EngineError
from realtime_qa.qacore.factory import EngineOptions
from realtime_qa.qacore.features import EngineInputs

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "segment_ids", "input_mask")
OUTPUT_NAMES = ("start_logits", "end_logits")
# First four bytes of a serialized plan, as observed on TensorRT 10 ("ftrt") and TensorRT-RTX 1.x ("vtrt").
PLAN_MAGIC = {b"ftrt": "tensorrt", b"vtrt": "tensorrt_rtx"}


def plan_library(plan: bytes) -> str:
    """Which library wrote a plan, from its first four bytes (EngineError if neither)."""
    library = PLAN_MAGIC.get(bytes(plan[:4]))
    if library is None:
        raise EngineError(f"not a TensorRT plan (it starts with {bytes(plan[:4])!r})")
    return library


def _runtime() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise EngineError("the TensorRT engine needs cuda-python (pip install 'realtime-qa[tensorrt]')") from None
    return cudart


def check(result: Any, what: str) -> Any:
    """Unwrap a cuda-python call's (error, *values) tuple; EngineError naming the call if it failed."""
    cudart = _runtime()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        raise EngineError(f"CUDA {what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else tuple(values) if values else None


class HostDeviceBuffer:
    """`count` items of `dtype` in pinned host memory (a numpy view) and in device memory."""

    def __init__(self, count: int, dtype: type[np.generic]) -> None:
        cudart = _runtime()
        self.dtype = np.dtype(dtype)
        self.nbytes = count * self.dtype.itemsize
        self.host_ptr: int = int(check(cudart.cudaMallocHost(self.nbytes), "cudaMallocHost"))
        self.device_ptr: int = int(check(cudart.cudaMalloc(self.nbytes), "cudaMalloc"))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.host_ptr)
        self.host = np.frombuffer(memoryview(raw).cast("B"), dtype=self.dtype)

    def to_device(self, nbytes: int, stream: Any) -> None:
        cudart = _runtime()
        kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(cudart.cudaMemcpyAsync(self.device_ptr, self.host_ptr, nbytes, kind, stream), "cudaMemcpyAsync H2D")

    def to_host(self, nbytes: int, stream: Any) -> None:
        cudart = _runtime()
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(cudart.cudaMemcpyAsync(self.host_ptr, self.device_ptr, nbytes, kind, stream), "cudaMemcpyAsync D2H")

    def free(self) -> None:
        cudart = _runtime()
        if self.device_ptr:
            cudart.cudaFree(self.device_ptr)
            cudart.cudaFreeHost(self.host_ptr)
            self.device_ptr = self.host_ptr = 0


class CudaGraph:
    """A stream's work between `capture()` and `end()`, replayed with `launch`."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.graph: Any = None
        self.exec: Any = None

    def begin(self) -> None:
        cudart = _runtime()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")

    def end(self) -> None:
        cudart = _runtime()
        self.graph = check(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        self.exec = check(cudart.cudaGraphInstantiate(self.graph, 0), "cudaGraphInstantiate")

    def launch(self) -> None:
        check(_runtime().cudaGraphLaunch(self.exec, self.stream), "cudaGraphLaunch")

    def destroy(self) -> None:
        cudart = _runtime()
        if self.exec is not None:
            cudart.cudaGraphExecDestroy(self.exec)
            cudart.cudaGraphDestroy(self.graph)
            self.exec = self.graph = None


class CudaBuffers:
    """The I/O of one execution context: 3 int32 inputs and 2 float32 outputs of up to `capacity` items."""

    def __init__(self, capacity: int) -> None:
        cudart = _runtime()
        flags = cudart.cudaStreamNonBlocking
        self.stream = check(cudart.cudaStreamCreateWithFlags(flags), "cudaStreamCreateWithFlags")
        self.capacity = capacity
        self.inputs = {name: HostDeviceBuffer(capacity, np.int32) for name in INPUT_NAMES}
        self.outputs = {name: HostDeviceBuffer(capacity, np.float32) for name in OUTPUT_NAMES}

    def stage(self, inputs: EngineInputs) -> None:
        """Copy a [batch, seq] batch into the pinned host inputs, contiguously, then to the device."""
        count = inputs.batch_size * inputs.seq_len
        for name, array in zip(INPUT_NAMES, (inputs.input_ids, inputs.segment_ids, inputs.input_mask), strict=True):
            buffer = self.inputs[name]
            buffer.host[:count] = np.asarray(array, dtype=np.int32).reshape(-1)
            buffer.to_device(count * 4, self.stream)

    def fetch(self, batch: int, seq: int) -> EngineOutputs:
        count = batch * seq
        for buffer in self.outputs.values():
            buffer.to_host(count * 4, self.stream)
        self.synchronize()
        start, end = (self.outputs[name].host[:count].reshape(batch, seq).copy() for name in OUTPUT_NAMES)
        return EngineOutputs(start, end)

    def synchronize(self) -> None:
        check(_runtime().cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def free(self) -> None:
        for buffer in (*self.inputs.values(), *self.outputs.values()):
            buffer.free()
        _runtime().cudaStreamDestroy(self.stream)


@dataclass(frozen=True)
class ProfileRange:
    index: int
    max_batch: int
    max_seq: int
    min_batch: int = 1
    min_seq: int = 1

    def fits(self, batch: int, seq: int) -> bool:
        return self.min_batch <= batch <= self.max_batch and self.min_seq <= seq <= self.max_seq


def read_profiles(engine: Any) -> list[ProfileRange]:
    """Each profile's [batch, seq] range for `input_ids` (all inputs share it), smallest first."""
    ranges = []
    for index in range(engine.num_optimization_profiles):
        low, _opt, high = engine.get_tensor_profile_shape(INPUT_NAMES[0], index)
        ranges.append(ProfileRange(index, int(high[0]), int(high[1]), int(low[0]), int(low[1])))
    return ranges


def choose_profile(profiles: list[ProfileRange], batch: int, seq: int) -> ProfileRange:
    """The fitting profile with the least room (batch x seq), so TensorRT's kernels were tuned near it."""
    fitting = [p for p in profiles if p.fits(batch, seq)]
    if not fitting:
        raise EngineError(f"no optimization profile of this plan takes batch {batch} x sequence {seq}")
    return min(fitting, key=lambda p: (p.max_batch * p.max_seq, p.index))


@dataclass
class _Context:
    context: Any
    profiles: list[ProfileRange]
    buffers: CudaBuffers
    active_profile: int = -1
    graphs: dict[tuple[int, int, int], CudaGraph] = field(default_factory=dict)  # (profile, batch, seq)


@dataclass(frozen=True)
class TensorRTRuntimeConfig:
    device_id: int = 0
    streams: int = 1  # execution contexts; at most the number of profile copies in the plan
    cuda_graphs: bool = False  # capture each (batch, seq) once and replay it


class TensorRTEngine(Engine):
    """A deserialized TensorRT plan with one execution context (and stream, and buffers) per stream."""

    def __init__(
        self, meta: EngineMeta, plan: bytes, config: TensorRTRuntimeConfig, trt: ModuleType | None = None
    ) -> None:
        super().__init__(meta)
        self.config = config
        trt = trt or _import_runtime()
        cudart = _runtime()
        check(cudart.cudaSetDevice(config.device_id), f"cudaSetDevice({config.device_id})")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError(f"TensorRT {trt.__version__} cannot deserialize {meta.engine_file} (see its log above)")
        self._check_io(trt)
        profiles = read_profiles(self.engine)
        shapes = len(meta.builder_options.get("tensorrt", {}).get("profile_shapes", [])) or len(profiles)
        copies = max(1, len(profiles) // shapes)
        if config.streams > copies:
            raise EngineError(
                f"{config.streams} streams need a plan with {config.streams} profile copies; it has {copies}"
            )
        capacity = meta.max_batch_size * meta.max_seq_length
        self._free: queue.SimpleQueue[_Context] = queue.SimpleQueue()
        self._contexts: list[_Context] = []
        for stream in range(config.streams):
            context = self.engine.create_execution_context()
            if context is None:
                raise EngineError("TensorRT could not create an execution context (out of device memory?)")
            owned = profiles[stream * shapes : (stream + 1) * shapes]
            ctx = _Context(context, owned, CudaBuffers(capacity))
            for name, buffer in (*ctx.buffers.inputs.items(), *ctx.buffers.outputs.items()):
                if not context.set_tensor_address(name, buffer.device_ptr):
                    raise EngineError(f"TensorRT refused the address of {name}")
            self._contexts.append(ctx)
            self._free.put(ctx)

    def _check_io(self, trt: ModuleType) -> None:
        engine = self.engine
        names = {engine.get_tensor_name(index) for index in range(engine.num_io_tensors)}
        wanted = [(name, trt.TensorIOMode.INPUT, trt.DataType.INT32) for name in INPUT_NAMES]
        wanted += [(name, trt.TensorIOMode.OUTPUT, trt.DataType.FLOAT) for name in OUTPUT_NAMES]
        for name, mode, dtype in wanted:
            if name not in names or engine.get_tensor_mode(name) != mode or engine.get_tensor_dtype(name) != dtype:
                raise EngineError(f"plan lacks {dtype} {str(mode).split('.')[-1].lower()} {name!r}")

    def infer(self, inputs: EngineInputs) -> EngineOutputs:
        self.check_inputs(inputs)
        batch, seq = inputs.batch_size, inputs.seq_len
        ctx = self._free.get()
        try:
            ctx.buffers.stage(inputs)
            self._enqueue(ctx, batch, seq)
            return ctx.buffers.fetch(batch, seq)
        finally:
            self._free.put(ctx)

    def _enqueue(self, ctx: _Context, batch: int, seq: int) -> None:
        stream = ctx.buffers.stream
        profile = choose_profile(ctx.profiles, batch, seq)
        if profile.index != ctx.active_profile:
            if not ctx.context.set_optimization_profile_async(profile.index, int(stream)):
                raise EngineError(f"TensorRT could not switch to optimization profile {profile.index}")
            ctx.active_profile = profile.index
        for name in INPUT_NAMES:
            if not ctx.context.set_input_shape(name, (batch, seq)):
                raise EngineError(f"TensorRT refused input shape ({batch}, {seq}) for {name}")
        if not self.config.cuda_graphs:
            self._execute(ctx)
            return
        # A graph is replayed only in the state it was captured in: this profile, these input shapes.
        key = (profile.index, batch, seq)
        graph = ctx.graphs.get(key)
        if graph is None:
            self._execute(ctx)  # TensorRT settles shape-dependent state before capture, as NVIDIA advises
            captured = CudaGraph(stream)
            captured.begin()
            try:
                self._execute(ctx)
            finally:
                captured.end()
            ctx.graphs[key] = graph = captured
        graph.launch()

    @staticmethod
    def _execute(ctx: _Context) -> None:
        if not ctx.context.execute_async_v3(int(ctx.buffers.stream)):
            raise EngineError("TensorRT execute_async_v3 failed (see its log above)")

    def close(self) -> None:
        for ctx in self._contexts:
            ctx.buffers.synchronize()
            for graph in ctx.graphs.values():
                graph.destroy()
            ctx.buffers.free()
        self._contexts.clear()


def _import_runtime() -> ModuleType:
    try:
        import tensorrt

        return tensorrt
    except ImportError:
        pass
    try:
        import tensorrt_rtx  # TensorRT for RTX runs its own plans on the GPUs it supports

        return tensorrt_rtx
    except ImportError:
        raise EngineError("TensorRT is not installed here (pip install 'realtime-qa[tensorrt]')") from None


def open_engine(engine_dir: Path, meta: EngineMeta, options: EngineOptions) -> TensorRTEngine:
    """The backend entry point `qacore.factory.load_engine` calls."""
    plan = (engine_dir / meta.engine_file).read_bytes()
    library = plan_library(plan)
    trt = _import_runtime()
    if trt.__name__ != library:
        raise EngineError(f"{engine_dir / meta.engine_file} was built by {library}; this host has {trt.__name__}")
    config = TensorRTRuntimeConfig(device_id=options.device_id, cuda_graphs=options.use_cuda_graphs)
    return TensorRTEngine(meta, plan, config, trt)
