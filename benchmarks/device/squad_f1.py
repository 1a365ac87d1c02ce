"""SQuAD v1.1 dev F1 through each GPU engine path of the shipped model (run on the GPU machine).

    python3 -m realtime_qa.benchmarks.device.squad_f1 --squad dev-v1.1.json.gz --out squad_f1.json [--with-onnxruntime]

Paths, by index for `--paths`: 0-1 the previous engine (`layer_fusion=False, splitk_gemm=False`), 2-3 the
layer-fused engine, 4-5 the split-K GEMM engine (`splitk_gemm=True, attention_kernel=False`), 6-7 the split-K
engine with the Triton attention kernel and the QA head in the last LayerNorm (the default since issue 12's
attention work); each first with logits decoded on the CPU, then with the span search on the device (what
`QuestionAnswerer` uses when the engine offers it). `--gemm-table REPORT` runs the split-K paths with the table
of a `qa-bench engine --gemm-sweep` report instead of the committed `torch_gemm.TABLE`. ONNX Runtime fp32 on the
host's cores is the reference (`--with-onnxruntime`; otherwise the recorded 86.26 of the same weights is quoted).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from realtime_qa.benchmarks.engine_bench import SHIPPED_MODEL_DIR, LogitsOnly
from realtime_qa.builder.build import BuildConfig, build_engine
from realtime_qa.qacore.answerer import QuestionAnswerer
from realtime_qa.qacore.backends.torch_cuda import TorchCudaEngine, TorchEngineConfig, load_weights
from realtime_qa.qacore.bundle import featurizer_for_engine
from realtime_qa.qacore.engine import Engine, EngineMeta
from realtime_qa.qacore.factory import load_engine
from realtime_qa.qacore.squad import read_dataset
from realtime_qa.qacore.squad_answering import answer_dataset
from realtime_qa.qacore.squad_metric import evaluate

# ONNX Runtime fp32 on CPU, full v1.1 dev, the shipped weights (the model soup): benchmarks/results/cpu_accuracy.md
RECORDED_ONNXRUNTIME_F1 = 86.26


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--squad", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=0, help="first N questions only (0: all)")
    parser.add_argument("--with-onnxruntime", action="store_true")
    parser.add_argument("--paths", default="", help="comma-separated indices of the paths to run (default: all)")
    parser.add_argument("--gemm-table", type=Path, default=None, help="engine_bench JSON report with a gemm_table")
    args = parser.parse_args()
    if args.gemm_table is not None:
        from realtime_qa.benchmarks.gemm_sweep import table_from_json
        from realtime_qa.qacore.backends import torch_gemm

        torch_gemm.TABLE = table_from_json(json.loads(args.gemm_table.read_text(encoding="utf-8"))["gemm_table"])
    dataset = read_dataset(args.squad)
    if args.limit:
        dataset = dataset.head(args.limit)
    work = Path(tempfile.mkdtemp())
    torch_dir = build_engine(
        BuildConfig(checkpoint=SHIPPED_MODEL_DIR, output=work / "torch", backend="torch", fp16=True,
                    batch_sizes=(1, 8, 32))
    )  # fmt: skip
    meta = EngineMeta.read(torch_dir)
    weights = load_weights(torch_dir / meta.engine_file)

    def torch_engine(layer_fusion: bool, splitk_gemm: bool = False, attention_kernel: bool = False) -> TorchCudaEngine:
        config = TorchEngineConfig(
            layer_fusion=layer_fusion, splitk_gemm=splitk_gemm, attention_kernel=attention_kernel
        )
        return TorchCudaEngine(meta, weights, config)

    def spans_and_logits(name: str, **options: bool) -> list[tuple[str, Callable[[], Engine], Path]]:
        """The engine with the device span search, and the same engine with logits decoded on the CPU."""
        return [
            (f"{name}, CPU decode", lambda: LogitsOnly(torch_engine(**options)), torch_dir),
            (f"{name}, device span search", lambda: torch_engine(**options), torch_dir),
        ]

    # Made when run (each captures its graphs), so --paths builds only the engines it names.
    paths = [
        *spans_and_logits("previous engine (fused, layer_fusion=False)", layer_fusion=False),
        *spans_and_logits("layer-fused engine", layer_fusion=True),
        *spans_and_logits("split-K GEMM engine", layer_fusion=False, splitk_gemm=True),
        *spans_and_logits("split-K + attention kernel", layer_fusion=False, splitk_gemm=True, attention_kernel=True),
    ]
    if args.paths:
        paths = [paths[int(index)] for index in args.paths.split(",")]
    if args.with_onnxruntime:
        ort_dir = build_engine(BuildConfig(checkpoint=SHIPPED_MODEL_DIR, output=work / "ort", backend="onnxruntime"))
        paths.append(("ONNX Runtime fp32 (host CPU cores)", lambda: load_engine(ort_dir), ort_dir))
    record: dict[str, object] = {"questions": dataset.num_questions, "paths": {}}
    for name, make_engine, engine_dir in paths:
        began = time.perf_counter()
        engine = make_engine()
        with QuestionAnswerer(engine, featurizer_for_engine(engine, engine_dir, None)) as answerer:
            run = answer_dataset(answerer, dataset, batch_size=32, progress=False)
        scores = evaluate(dataset, run.predictions, "1.1")
        record["paths"][name] = {"scores": scores.values, "seconds": time.perf_counter() - began}  # type: ignore[index]
        print(f"{name}: EM {float(scores['exact_match']):.2f} F1 {float(scores['f1']):.2f}", flush=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    reference = RECORDED_ONNXRUNTIME_F1
    if args.with_onnxruntime:
        reference = float(record["paths"]["ONNX Runtime fp32 (host CPU cores)"]["scores"]["f1"])  # type: ignore[index]
    record["reference_f1"] = reference
    for name, entry in record["paths"].items():  # type: ignore[attr-defined]
        difference = float(entry["scores"]["f1"]) - reference
        print(f"{name}: F1 - ONNX Runtime fp32 = {difference:+.3f} ({'OK' if abs(difference) <= 0.1 else 'OVER 0.1'})")
    first = next(iter(record["paths"].values()))  # type: ignore[attr-defined]
    for name, entry in record["paths"].items():  # type: ignore[attr-defined]
        difference = float(entry["scores"]["f1"]) - float(first["scores"]["f1"])
        print(f"{name}: F1 - first path = {difference:+.3f} ({'OK' if abs(difference) <= 0.1 else 'OVER 0.1'})")
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
