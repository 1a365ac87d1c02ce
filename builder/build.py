"""One build step: a checkpoint becomes an engine directory for one backend.

    BuildConfig -> load_checkpoint -> ONNX graph (fp32 | fp16 | INT8 QDQ) -> backend build -> engine dir + meta.json

Backend build steps share one contract, so `build_engine` writes the directory, the tokenizer and
`meta.json` the same way for all of them:

    build_<backend>_engine(onnx_path: Path, out_dir: Path, config: BuildConfig) -> BackendBuild

`onnx_path` is the graph to compile: fp32, fp16 (weights and compute, logits fp32: for strongly typed
TensorRT) when `config.fp16`, or INT8 QDQ (symmetric, calibrated on SQuAD) when `config.int8`.
`out_dir` is a private staging directory the step writes its engine file into; `build_engine` adds
the tokenizer and meta.json and moves it into place only when everything succeeded.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from realtime_qa.builder.build_config import (
    BACKENDS,
    DEFAULT_BATCH_SIZES,
    DEFAULT_CALIB_NUM,
    DEFAULT_SEQUENCE_LENGTHS,
    BackendBuild,
    BuildConfig,
)
from realtime_qa.builder.checkpoint import load_checkpoint
from realtime_qa.builder.engine_dir import stage_engine_dir, write_engine_dir
from realtime_qa.builder.model_weights import Checkpoint
from realtime_qa.builder.onnx_graph import GraphOptions, save_graph
from realtime_qa.qacore.errors import InvalidInputError

__all__ = [
    "BACKENDS",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_CALIB_NUM",
    "DEFAULT_SEQUENCE_LENGTHS",
    "BackendBuild",
    "BuildConfig",
    "build_engine",
]

log = logging.getLogger(__name__)


def build_engine(config: BuildConfig) -> Path:
    """Build the engine `config` describes into `config.output` (atomically) and return that path."""
    started = time.perf_counter_ns()
    checkpoint = load_checkpoint(
        config.checkpoint,
        init_qa_head_seed=config.init_qa_head_seed,
        config_dir=config.config_dir,
        vocab_file=config.vocab_file,
    )
    limit = checkpoint.config.max_position_embeddings
    if config.max_seq_length > limit:
        raise InvalidInputError(
            f"sequence length {config.max_seq_length} exceeds the model's max_position_embeddings {limit}"
        )
    log.info(
        "building %s %s engine for %s into %s", config.backend, config.precision, checkpoint.model_id, config.output
    )
    with stage_engine_dir(config.output, replace=config.force) as staging:
        if config.backend == "torch":
            built = build_torch_weights(checkpoint, staging, config)
        else:
            with tempfile.TemporaryDirectory(prefix="qa-build-") as scratch:
                built = build_from_onnx(checkpoint, staging, Path(scratch), config)
        write_engine_dir(staging, checkpoint, config, built)
    log.info("built %s in %.1f s", config.output, (time.perf_counter_ns() - started) / 1e9)
    return config.output


def build_from_onnx(checkpoint: Checkpoint, staging: Path, scratch: Path, config: BuildConfig) -> BackendBuild:
    """Export the graph the backend compiles, then run that backend's build step."""
    onnx_path = scratch / "model.onnx"
    fp16_graph = config.backend == "tensorrt" and config.fp16 and not config.int8
    save_graph(checkpoint, onnx_path, GraphOptions(fp16=fp16_graph))
    if config.backend == "onnxruntime":
        from realtime_qa.builder.onnxruntime_build import build_onnxruntime_engine

        return build_onnxruntime_engine(onnx_path, staging, config, checkpoint)
    if config.int8:
        # TensorRT builds INT8 from explicit quantization: a QDQ graph calibrated like the CPU one,
        # with symmetric activations (zero point 0) as TensorRT requires.
        from realtime_qa.builder.onnxruntime_build import quantize_qdq_for_tensorrt

        onnx_path = quantize_qdq_for_tensorrt(onnx_path, scratch, config, checkpoint)
    from realtime_qa.builder.tensorrt_build import build_tensorrt_engine

    return build_tensorrt_engine(onnx_path, staging, config)


def build_torch_weights(checkpoint: Checkpoint, staging: Path, config: BuildConfig) -> BackendBuild:
    """The PyTorch engine compiles at load time; its engine file is the canonical weights themselves.

    One safetensors file, HF `BertForQuestionAnswering` names, dtype of the engine's precision:
    `qacore.backends.torch_network.BertForQA.load_weights` takes it as it is.
    """
    import numpy as np
    import safetensors
    from safetensors.numpy import save_file

    dtype = np.float16 if config.fp16 else np.float32
    tensors = {name: np.ascontiguousarray(value, dtype=dtype) for name, value in checkpoint.weights.items()}
    engine_file = "model.safetensors"
    save_file(tensors, str(staging / engine_file), metadata={"format": "pt"})
    return BackendBuild(engine_file, f"safetensors {safetensors.__version__}")
