"""ONNX Runtime engine on CPU: the default backend, for fp32 (fused) and INT8 (calibrated) graphs.

The graph has dynamic batch and sequence axes, so a batch is run as wide as its longest window
(`Featurizer.batch` pads no further) and short questions over short passages cost little.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from realtime_qa.qacore.engine import Engine, EngineMeta, EngineOutputs
from realtime_qa.qacore.errors import EngineError, EngineFaultError
from realtime_qa.qacore.factory import EngineOptions
from realtime_qa.qacore.features import EngineInputs

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "segment_ids", "input_mask")
OUTPUT_NAMES = ("start_logits", "end_logits")


class OrtEngine(Engine):
    """A BERT QA graph in an `onnxruntime.InferenceSession` on the CPU execution provider."""

    def __init__(self, model_path: Path, meta: EngineMeta, options: EngineOptions | None = None) -> None:
        super().__init__(meta)
        import onnxruntime as ort

        options = options or EngineOptions()
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if options.allow_spinning else "0"
        )
        session_options.log_severity_level = 3  # warnings about unused initializers are noise here
        try:
            self.session: ort.InferenceSession | None = ort.InferenceSession(
                str(model_path), session_options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise EngineError(f"ONNX Runtime cannot load {model_path}: {first_line(exc)}") from None
        self._check_signature(model_path)

    def _check_signature(self, model_path: Path) -> None:
        assert self.session is not None
        inputs = {node.name: node.type for node in self.session.get_inputs()}
        outputs = {node.name for node in self.session.get_outputs()}
        if set(inputs) != set(INPUT_NAMES) or any(inputs[name] != "tensor(int32)" for name in INPUT_NAMES):
            raise EngineError(f"{model_path} takes {inputs}, not int32 {', '.join(INPUT_NAMES)}")
        if not set(OUTPUT_NAMES) <= outputs:
            raise EngineError(f"{model_path} lacks outputs {', '.join(sorted(set(OUTPUT_NAMES) - outputs))}")

    def infer(self, inputs: EngineInputs) -> EngineOutputs:
        if self.session is None:
            raise EngineError("engine is closed")
        self.check_inputs(inputs)
        feed = {
            "input_ids": np.ascontiguousarray(inputs.input_ids, dtype=np.int32),
            "segment_ids": np.ascontiguousarray(inputs.segment_ids, dtype=np.int32),
            "input_mask": np.ascontiguousarray(inputs.input_mask, dtype=np.int32),
        }
        try:
            start_logits, end_logits = self.session.run(list(OUTPUT_NAMES), feed)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
            raise EngineFaultError(f"ONNX Runtime failed to run the engine: {first_line(exc)}") from None
        return EngineOutputs(np.asarray(start_logits, np.float32), np.asarray(end_logits, np.float32))

    def close(self) -> None:
        # Dropping the session frees its arena and thread pools.
        self.session = None


def open_engine(engine_dir: Path, meta: EngineMeta, options: EngineOptions) -> OrtEngine:
    """The backend entry point `qacore.factory.load_engine` calls."""
    return OrtEngine(engine_dir / meta.engine_file, meta, options)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
