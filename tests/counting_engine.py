"""The real torch engine (fp32, on the CPU) that counts its calls: tests of batching assert on what it ran."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from realtime_qa.qacore.backends.torch_cuda import TorchCudaEngine, TorchEngineConfig, load_weights
from realtime_qa.qacore.engine import EngineMeta, EngineOutputs, EngineSpans
from realtime_qa.qacore.features import EngineInputs


class CountingEngine(TorchCudaEngine):
    """The real torch engine (fp32, CPU), counting its calls by kind and rows."""

    def __init__(self, engine_dir: Path) -> None:
        meta = EngineMeta.read(engine_dir)
        config = TorchEngineConfig(device="cpu", cuda_graphs=False)
        super().__init__(meta, load_weights(engine_dir / meta.engine_file), config)
        self.rows: Counter[str] = Counter()
        self.calls: list[tuple[str, int]] = []  # (kind, rows) per call, kind "logits" or "spans<length>"

    def infer(self, inputs: EngineInputs) -> EngineOutputs:
        self.calls.append(("logits", inputs.batch_size))
        self.rows["logits"] += inputs.batch_size
        return super().infer(inputs)

    def infer_spans(
        self, inputs: EngineInputs, may_start: np.ndarray, may_end: np.ndarray, max_answer_length: int
    ) -> EngineSpans:
        kind = f"spans{max_answer_length}"
        self.calls.append((kind, inputs.batch_size))
        self.rows[kind] += inputs.batch_size
        return super().infer_spans(inputs, may_start, may_end, max_answer_length)
