"""Choosing and loading the engine backend that an engine directory's `meta.json` names.

Backends are imported only when an engine of their kind is loaded, so a CPU host serving an ONNX
Runtime engine never imports TensorRT, CUDA or PyTorch.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from realtime_qa.qacore.engine import Engine, EngineMeta
from realtime_qa.qacore.errors import CheckpointError, EngineError
from realtime_qa.qacore.files import sha256_file

log = logging.getLogger(__name__)

# backend name in meta.json -> module defining `open_engine(engine_dir, meta, options) -> Engine`
BACKEND_MODULES = {
    "onnxruntime": "realtime_qa.qacore.backends.onnxruntime",
    "tensorrt": "realtime_qa.qacore.backends.tensorrt",
    "torch": "realtime_qa.qacore.backends.torch_cuda",
}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class EngineOptions:
    """How to run an engine on this host; what the engine *is* lives in its meta.json.

    Thread counts apply to CPU backends (0 = the runtime's default: one thread per physical core);
    `device_id` and `use_cuda_graphs` to GPU backends. Each backend ignores what does not apply to it.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    # Idle worker threads spin briefly before sleeping: lower latency, but they take CPU from the
    # event loop and other engines; turn off where cores are shared.
    allow_spinning: bool = True
    device_id: int = 0
    # GPU backends capture one CUDA graph per padded shape and replay it: several times faster at
    # batch 1 (benchmarks/results/engine_h100.md). Off runs eagerly, for debugging.
    use_cuda_graphs: bool = True
    # How a GPU engine's thread waits for its results: spinning (CUDA's default with one context; ~60 us
    # sooner on the H200) or sleeping on a blocking-sync event. Spinning burns a core for the whole wait,
    # which several processes sharing one GPU cannot afford: each waits out the others' time slices
    # (benchmarks/results/serve_h200_workers.md).
    gpu_blocking_sync: bool = False

    def __post_init__(self) -> None:
        limit = max_engine_threads()
        if not (0 <= self.intra_op_threads <= limit and 0 <= self.inter_op_threads <= limit):
            raise EngineError(
                f"thread counts must be in [0, {limit}] (this machine's cores), got "
                f"intra_op_threads={self.intra_op_threads}, inter_op_threads={self.inter_op_threads}"
            )
        if self.device_id < 0:
            raise EngineError(f"device_id must be >= 0, got {self.device_id}")


def max_engine_threads() -> int:
    """The most CPU threads one engine may ask for: this machine's cores (more only adds contention)."""
    return os.cpu_count() or 1


def load_engine(engine_dir: Path, options: EngineOptions | None = None) -> Engine:
    """Open the engine in `engine_dir` with the backend its meta.json names.

    Raises `EngineError` (one line, naming the directory or file) when the directory, its metadata or
    its engine file is missing or inconsistent, or the backend is unknown or cannot be imported here.
    """
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise EngineError(f"engine directory not found: {engine_dir}")
    try:
        meta = EngineMeta.read(engine_dir)
    except CheckpointError as exc:  # the model config inside meta.json is invalid
        raise EngineError(f"engine metadata in {engine_dir} is invalid: {exc}") from None
    check_meta(meta, engine_dir)
    verify_engine_file(meta, engine_dir)
    module_name = BACKEND_MODULES[meta.backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineError(
            f"engine {engine_dir} needs the {meta.backend} backend, which cannot be loaded here: {exc}"
        ) from None
    log.info("loading %s %s engine from %s", meta.backend, meta.precision, engine_dir)
    engine: Engine = module.open_engine(engine_dir, meta, options or EngineOptions())
    return engine


def verify_engine_file(meta: EngineMeta, engine_dir: Path) -> None:
    """Refuse an engine file whose SHA-256 is not the one recorded at build time (corrupted or swapped)."""
    if not meta.engine_sha256:
        raise EngineError(f"engine {engine_dir} records no engine_sha256 (built by an older qa-build); rebuild it")
    path = engine_dir / meta.engine_file
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise EngineError(f"cannot read engine file {path}: {exc.strerror or exc}") from None
    if actual != meta.engine_sha256:
        raise EngineError(
            f"engine file {path} is corrupt: its SHA-256 {actual[:12]}... is not the {meta.engine_sha256[:12]}... "
            "recorded in meta.json; rebuild the engine"
        )


def check_meta(meta: EngineMeta, engine_dir: Path) -> None:
    """Refuse metadata that no backend could honour, before any runtime library is imported."""
    if meta.backend not in BACKEND_MODULES:
        raise EngineError(
            f"engine {engine_dir} names unknown backend {meta.backend!r}; known: {', '.join(BACKEND_MODULES)}"
        )
    if meta.precision not in PRECISIONS:
        raise EngineError(f"engine {engine_dir} names unknown precision {meta.precision!r}")
    if not meta.engine_file or Path(meta.engine_file).name != meta.engine_file:
        raise EngineError(
            f"engine {engine_dir}: engine_file must be a file name in the directory, got {meta.engine_file!r}"
        )
    if not (engine_dir / meta.engine_file).is_file():
        raise EngineError(f"engine file {meta.engine_file} listed in meta.json is missing from {engine_dir}")
    if meta.max_batch_size < 1:
        raise EngineError(f"engine {engine_dir}: max_batch_size must be >= 1, got {meta.max_batch_size}")
    lengths = meta.sequence_lengths
    if not lengths or any(length < 1 for length in lengths) or list(lengths) != sorted(set(lengths)):
        raise EngineError(f"engine {engine_dir}: sequence_lengths must be ascending positive integers, got {lengths}")
    if meta.null_threshold is not None and not math.isfinite(meta.null_threshold):
        raise EngineError(f"engine {engine_dir}: null_threshold must be a finite number, got {meta.null_threshold}")
    if meta.max_seq_length > meta.model_config.max_position_embeddings:
        raise EngineError(
            f"engine {engine_dir}: sequence length {meta.max_seq_length} exceeds the model's "
            f"{meta.model_config.max_position_embeddings} positions"
        )
