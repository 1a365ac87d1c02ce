"""The real torch engine (fp32, on the CPU) that counts its calls: tests of batching assert on what it ran."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from realtime_qa.qacore.backends.torch_cuda import TorchCudaEngine, TorchEngineConfig, load_weights
from realtime_qa.qacore.engine import EngineMeta, EngineOutputs, EngineSpans, PendingSpans
from realtime_qa.qacore.errors import EngineError
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


class PolledEngine(CountingEngine):
    """The same engine behind a GPU engine's launch-and-poll interface (`Engine.launch_spans`): the spans are the real
    engine's, computed at launch; `ready()` turns true only after `polls_needed` polls, as a device still working
    would, and `open` counts the launches whose result was not taken yet (each holds a GPU engine's lock)."""

    def __init__(self, engine_dir: Path, polls_needed: int = 3) -> None:
        super().__init__(engine_dir)
        self.polls_needed = polls_needed
        self.launches = 0
        self.polls = 0
        self.open = 0

    def launches_spans(self) -> bool:
        return True

    def launch_spans(
        self, inputs: EngineInputs, may_start: np.ndarray, may_end: np.ndarray, max_answer_length: int
    ) -> PendingSpans:
        spans = self.infer_spans(inputs, may_start, may_end, max_answer_length)
        self.launches += 1
        self.open += 1
        return _Pending(self, spans)


class _Pending(PendingSpans):
    def __init__(self, engine: PolledEngine, spans: EngineSpans) -> None:
        self.engine, self.spans, self.polls, self.taken = engine, spans, 0, False

    def ready(self) -> bool:
        self.polls += 1
        self.engine.polls += 1
        return self.polls >= self.engine.polls_needed

    def result(self) -> EngineSpans:
        if self.taken:
            raise EngineError("the span search's result was already taken")
        self.taken = True
        self.engine.open -= 1
        return self.spans
