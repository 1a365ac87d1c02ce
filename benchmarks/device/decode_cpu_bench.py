"""CPU cost of decoding one question from logits (`decode`) vs from the device span search (`decode_spans`).

    python -m realtime_qa.benchmarks.device.decode_cpu_bench [--questions 150]

The span search itself runs here as its plain-torch reference (on a GPU it is a Triton kernel inside the
engine's CUDA graph): only the host-side decoding that each path leaves to the CPU is timed, per question,
on the shipped model's real logits (the fp32 torch engine on CPU). Prints the medians and how many answers
agree.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from realtime_qa.benchmarks.engine_bench import SHIPPED_MODEL_DIR
from realtime_qa.builder.build import BuildConfig, build_engine
from realtime_qa.qacore.backends.torch_cuda import (
    TorchCudaEngine,
    TorchEngineConfig,
    load_weights,
    span_flags,
    spans_from_device,
)
from realtime_qa.qacore.backends.torch_spans import top_spans_reference
from realtime_qa.qacore.batching import pad_batch
from realtime_qa.qacore.decoding import DecoderConfig, decode, decode_spans, span_masks
from realtime_qa.qacore.engine import EngineMeta
from realtime_qa.qacore.features import Featurizer
from realtime_qa.qacore.squad import read_dataset
from realtime_qa.qacore.tokenization import load_tokenizer

DEFAULT_SQUAD = Path(__file__).resolve().parents[3] / "shared" / "data" / "squad" / "dev-v1.1.json.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--squad", type=Path, default=DEFAULT_SQUAD)
    parser.add_argument("--questions", type=int, default=150)
    args = parser.parse_args()
    engine_dir = build_engine(
        BuildConfig(checkpoint=SHIPPED_MODEL_DIR, output=Path(tempfile.mkdtemp()) / "engine", backend="torch")
    )
    meta = EngineMeta.read(engine_dir)
    engine = TorchCudaEngine(
        meta, load_weights(engine_dir / meta.engine_file), TorchEngineConfig("cpu", cuda_graphs=False)
    )
    featurizer = Featurizer(load_tokenizer(SHIPPED_MODEL_DIR))
    config = DecoderConfig()
    top_k, band = engine.span_search_limits()
    from_logits, from_spans, masks, same = [], [], [], 0
    for paragraph, question in read_dataset(args.squad).questions(limit=args.questions):
        features = featurizer.featurize(question.question, paragraph.context)
        batch = pad_batch(features.windows, featurizer.special.pad_id)
        outputs = engine.infer(batch)
        began = time.perf_counter_ns()
        by_logits = decode(features, outputs.start_logits, outputs.end_logits, config)
        from_logits.append(time.perf_counter_ns() - began)
        began = time.perf_counter_ns()
        may_start, may_end = span_masks(features.windows, batch.seq_len)
        masks.append(time.perf_counter_ns() - began)
        logits = torch.from_numpy(np.stack([outputs.start_logits, outputs.end_logits], axis=-1))
        flags = torch.from_numpy(span_flags(may_start, may_end, config.max_answer_length))
        spans = spans_from_device(top_spans_reference(logits, flags, top_k).numpy(), top_k)
        began = time.perf_counter_ns()
        by_spans = decode_spans(features, spans, config)
        from_spans.append(time.perf_counter_ns() - began)
        same += by_logits.text == by_spans.text
    print(
        f"{len(from_logits)} questions, same answer {same}: decode (logits) p50 {np.median(from_logits) / 1e3:.0f} us; "
        f"span masks p50 {np.median(masks) / 1e3:.0f} us; decode_spans p50 {np.median(from_spans) / 1e3:.0f} us "
        f"(span search limits: top {top_k}, band {band})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
