#!/usr/bin/env bash
# CPU accuracy of the default engines: ONNX Runtime INT8 (the default CPU engine, ranges from the model's shipped
# calibration.json) against fp32 of the same model, scored by qa-eval on
#   - SQuAD v1.1 dev, all 10,570 questions (abstention off: qa-eval never abstains on v1.1 data), and
#   - SQuAD v2.0 dev, the second half of the articles (6,425 questions), with the model's shipped threshold
#     (`qa_null_threshold`, tuned on the first half only).
# One evaluation at a time, under `nice`, so the machine's other work keeps going. Re-run it after the model changes.
#
#   benchmarks/cpu_accuracy.sh [MODEL_DIR] [OUT_DIR]
#
# MODEL_DIR defaults to models/minilm-l6-squad; OUT_DIR (default $TMPDIR/cpu_accuracy/<UTC time>, outside the repository) receives the
# engines, each run's metric JSON and log, and summary.json (machine, load, commands, figures, INT8 - fp32 gaps).
# Environment: PYTHON (default .venv/bin/python, else python3), SQUAD_DIR (default ../shared/data/squad),
# BATCH_SIZE (default 16), THREADS (default 0: one per physical core), PRECISIONS (default "fp32 int8"),
# SETS (default "v1.1 v2.0-second").
set -euo pipefail

cd "$(dirname "$0")/.."
MODEL_DIR=${1:-models/minilm-l6-squad}
OUT_DIR=${2:-${TMPDIR:-/tmp}/cpu_accuracy/$(date -u +%Y%m%dT%H%M%SZ)}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SQUAD_DIR=${SQUAD_DIR:-../shared/data/squad}
BATCH_SIZE=${BATCH_SIZE:-16}
THREADS=${THREADS:-0}
PRECISIONS=${PRECISIONS:-fp32 int8}
SETS=${SETS:-v1.1 v2.0-second}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
echo "model $MODEL_DIR -> $OUT_DIR" >&2

for precision in $PRECISIONS; do
  # The default engine of MODEL_DIR, built in OUT_DIR's own cache (INT8: from the model's calibration.json).
  engine=$(nice "$PYTHON" -m realtime_qa.builder.cli --default --default-model-dir "$MODEL_DIR" \
    --precision "$precision" --cache-root "$OUT_DIR/engines" | tail -n 1 | sed "s/  (.*//")
  echo "$engine" > "$OUT_DIR/engine_$precision.txt"
  for set in $SETS; do
    case $set in
      v1.1) data=(--squad-json "$SQUAD_DIR/dev-v1.1.json.gz") ;;
      v2.0-second) data=(--squad-json "$SQUAD_DIR/dev-v2.0.json.gz" --article-half second) ;;
      *) echo "unknown set $set" >&2; exit 2 ;;
    esac
    started=$(date +%s)
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    nice "$PYTHON" -m realtime_qa.qacore.eval_cli --engine "$engine" "${data[@]}" --batch-size "$BATCH_SIZE" \
      --threads "$THREADS" --out-file "$OUT_DIR/${precision}_${set}.json" > "$OUT_DIR/${precision}_${set}.log" 2>&1
    printf '{"seconds": %d, "load_before": "%s", "load_after": "%s", "command": "qa-eval --engine %s %s --batch-size %s --threads %s"}\n' \
      "$(($(date +%s) - started))" "$load_before" "$(cut -d' ' -f1-3 /proc/loadavg)" "$engine" "${data[*]}" \
      "$BATCH_SIZE" "$THREADS" > "$OUT_DIR/${precision}_${set}.run.json"
    echo "$precision $set: $(tail -n 1 "$OUT_DIR/${precision}_${set}.log")" >&2
  done
done

"$PYTHON" - "$OUT_DIR" "$MODEL_DIR" <<'EOF'
import json, os, platform, sys
from pathlib import Path

import onnxruntime

out, model_dir = Path(sys.argv[1]), Path(sys.argv[2])
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
config = json.loads((model_dir / "config.json").read_text())
runs = {}
for metrics in sorted(out.glob("*_*.json")):
    if metrics.name.endswith(".run.json") or metrics.name == "summary.json":
        continue
    precision, dataset = metrics.stem.split("_", 1)
    run = json.loads(metrics.with_suffix(".run.json").read_text())
    runs.setdefault(dataset, {})[precision] = {**json.loads(metrics.read_text()), **run}
gaps = {
    dataset: round(by["int8"]["f1"] - by["fp32"]["f1"], 4)
    for dataset, by in runs.items()
    if {"int8", "fp32"} <= by.keys()
}
engines = {}
for name in sorted(out.glob("engine_*.txt")):
    meta = json.loads((Path(name.read_text().strip()) / "meta.json").read_text())
    engines[name.stem.removeprefix("engine_")] = {
        "engine": str(Path(name.read_text().strip()).name),
        "quantization": meta["builder_options"].get("quantization"),
    }
summary = {
    "machine": f"{cpu}, {os.cpu_count()} logical CPUs, {platform.platform()}",
    "engines": engines,
    "onnxruntime": onnxruntime.__version__,
    "model_dir": str(model_dir),
    "qa_null_threshold": config.get("qa_null_threshold"),
    "runs": runs,
    "f1_int8_minus_fp32": gaps,
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({"f1": {d: {p: round(r["f1"], 2) for p, r in by.items()} for d, by in runs.items()}, "gap": gaps}))
EOF
