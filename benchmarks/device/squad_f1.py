"""SQuAD v1.1 dev F1 through each GPU engine path of the shipped model (run on the GPU machine).

    python3 -m realtime_qa.benchmarks.device.squad_f1 --squad dev-v1.1.json.gz --out squad_f1.json [--with-onnxruntime]

Paths: the previous engine (`layer_fusion=False`, logits decoded on the CPU), the layer-fused engine
and the split-K GEMM engine (`splitk_gemm=True`), each with logits decoded on the CPU and with the span
search on the device (what `QuestionAnswerer` uses when the engine offers it). `--gemm-table REPORT`
runs the split-K paths with the table of a `qa-bench engine --gemm-sweep` report instead of the
committed `torch_gemm.TABLE`. ONNX Runtime fp32 on the host's cores is the
reference (`--with-onnxruntime`; otherwise the recorded 86.71 of the same model is quoted).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
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

RECORDED_ONNXRUNTIME_F1 = 86.71  # benchmarks/results/engine_h100.md, full dev, same model


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

    def torch_engine(layer_fusion: bool, splitk_gemm: bool = False) -> TorchCudaEngine:
        return TorchCudaEngine(meta, weights, TorchEngineConfig(layer_fusion=layer_fusion, splitk_gemm=splitk_gemm))

    paths: list[tuple[str, Engine, Path]] = [
        (
            "previous engine (fused, layer_fusion=False), CPU decode",
            LogitsOnly(torch_engine(layer_fusion=False)),
            torch_dir,
        ),
        ("previous engine (fused), device span search", torch_engine(layer_fusion=False), torch_dir),
        ("layer-fused engine, CPU decode", LogitsOnly(torch_engine(layer_fusion=True)), torch_dir),
        ("layer-fused engine, device span search", torch_engine(layer_fusion=True), torch_dir),
        ("split-K GEMM engine, CPU decode", LogitsOnly(torch_engine(False, splitk_gemm=True)), torch_dir),
        ("split-K GEMM engine, device span search", torch_engine(False, splitk_gemm=True), torch_dir),
    ]
    if args.paths:
        paths = [paths[int(index)] for index in args.paths.split(",")]
    if args.with_onnxruntime:
        ort_dir = build_engine(BuildConfig(checkpoint=SHIPPED_MODEL_DIR, output=work / "ort", backend="onnxruntime"))
        paths.append(("ONNX Runtime fp32 (host CPU cores)", load_engine(ort_dir), ort_dir))
    record: dict[str, object] = {"questions": dataset.num_questions, "paths": {}}
    for name, engine, engine_dir in paths:
        began = time.perf_counter()
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
