#!/usr/bin/env bash
# One call (carry .carry/neg = train-v1.1, dev-v1.1, dev-v2.0 .json.gz): tune the shipped model with synthetic
# negatives under each CONFIG side by side on the one GPU, each run also scoring the shipped model (baseline) on
# SQuAD v1.1 and v2.0 dev; then put one metrics.json, one train_log.jsonl and the runs' logs under $OUT, plus the
# float16 export of the best run only if it is clearly better on v2.0 and costs at most 0.5 F1 on v1.1.
# Usage: negatives.sh MAX_SECONDS CONFIG...
set -uo pipefail
source training/device/common.sh
max_seconds=$1; shift
cp .carry/neg/*.json.gz "$W/squad/" 2>/dev/null || { mkdir -p "$W/squad"; cp .carry/neg/*.json.gz "$W/squad/"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
pids=()
for cfg in "$@"; do
  timeout "$max_seconds" python3 -m realtime_qa.training.cli negatives --config "training/configs/$cfg.json" \
    --squad-dir "$W/squad" --base models/minilm-l6-squad --cache-dir "$W/cache" --run-dir "$W/runs/$cfg" \
    > "$W/logs/$cfg.log" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do wait "${pids[$i]}"; echo "run ${@:i+1:1} exit $?"; done
for cfg in "$@"; do echo "== $cfg"; cat "$W/logs/$cfg.log"; done > "$OUT/runs.log"
python3 - "$OUT" "$W/runs" "$@" <<'PY'
import json, shutil, sys
from pathlib import Path

out, runs, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
metrics, lines = {}, []
for name in names:
    if (runs / name / "metrics.json").is_file():
        metrics[name] = json.loads((runs / name / "metrics.json").read_text())
    if (runs / name / "train_log.jsonl").is_file():
        lines += [json.dumps({"run": name, **json.loads(line)}) for line in (runs / name / "train_log.jsonl").read_text().splitlines()]
(out / "metrics.json").write_text(json.dumps({"runs": metrics}, indent=2) + "\n")
(out / "train_log.jsonl").write_text("\n".join(lines) + "\n")
qualifying = []
for name, m in metrics.items():
    if "tuned" not in m:
        continue
    base, tuned = m["baseline"], m["tuned"]
    v1_cost = base["v1.1"]["f1"] - tuned["v1.1"]["f1"]
    gain_f1 = tuned["v2.0"]["f1"] - base["v2.0"]["f1"]
    gain_best = tuned["v2.0"]["best_f1"] - base["v2.0"]["best_f1"]
    print(f"{name}: v1.1 F1 cost {v1_cost:.2f}, v2.0 f1 gain {gain_f1:.2f}, best_f1 gain {gain_best:.2f}")
    if v1_cost <= 0.5 and gain_f1 >= 2.0 and gain_best >= 2.0:
        qualifying.append((tuned["v2.0"]["best_f1"], name))
if qualifying:
    best = max(qualifying)[1]
    (out / best).mkdir()
    for part in sorted((runs / best / "export").iterdir()):
        shutil.copy(part, out / best / part.name)
    print("export of", best, "comes back")
else:
    print("no run qualifies: no weights come back")
PY
ls -laR "$OUT"
