#!/usr/bin/env bash
# One call (carry .carry/abstain = train-v1.1, dev-v1.1, dev-v2.0 .json.gz and negatives.jsonl.xz of
# `qa-train hard-negatives`): tune the shipped model under each CONFIG side by side on the one GPU (the first run
# also scores the shipped model), then put results.tar.gz (every run's metrics.json, train_log.jsonl, console log
# and per-question v2.0 scores) under $OUT, plus the float16 export of the run with the best first-half v2.0 F1
# among those that keep SQuAD v1.1 dev F1 >= MIN_V1_F1 (none comes back when no run does).
# Usage: abstain.sh MAX_SECONDS MIN_V1_F1 CONFIG...
set -uo pipefail
source training/device/common.sh
max_seconds=$1; min_v1=$2; shift 2
mkdir -p "$W/squad" && cp .carry/abstain/*.json.gz "$W/squad/"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
# Featurize the positives once, so the runs do not all do it at the same time.
python3 - "$W" <<'PY'
import sys
from pathlib import Path
from realtime_qa.training.config import TrainConfig
from realtime_qa.training.data import cached_train_windows
w = Path(sys.argv[1])
print(cached_train_windows(w / "squad/train-v1.1.json.gz", Path("models/minilm-l6-squad"), TrainConfig("x").featurizer, w / "cache")[1])
PY
# Runs start in their own sessions (they outlive a call cut short); this call waits at most MAX_SECONDS for them,
# and the same command in the next call (while the machine is warm) starts none again: it waits and collects.
first=1
for cfg in "$@"; do
  if [ -e "$W/runs/$cfg.started" ]; then continue; fi
  extra=(); if [ $first = 1 ]; then extra=(--score-start); fi; first=0
  mkdir -p "$W/runs" && touch "$W/runs/$cfg.started"
  setsid nohup python3 -m realtime_qa.training.cli abstain --config "training/configs/$cfg.json" "${extra[@]}" \
    --squad-dir "$W/squad" --base models/minilm-l6-squad --cache-dir "$W/cache" --run-dir "$W/runs/$cfg" \
    --negatives .carry/abstain/negatives.jsonl.xz > "$W/logs/$cfg.log" 2>&1 < /dev/null &
done
deadline=$((SECONDS + max_seconds))
while [ $SECONDS -lt $deadline ]; do
  running=$(pgrep -fc "training.cli abstain" || true)
  [ "$running" = 0 ] && break
  sleep 5
done
status
python3 - "$OUT" "$W" "$min_v1" "$@" <<'PY'
import json, shutil, sys, tarfile
from pathlib import Path

out, w, min_v1, names = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
candidates = []
with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
    for name in names:
        run = w / "runs" / name
        tar.add(w / "logs" / f"{name}.log", arcname=f"{name}/console.log")
        for file in ("metrics.json", "train_log.jsonl", "v2_scores.json", "start_v2_scores.json"):
            if (run / file).is_file():
                tar.add(run / file, arcname=f"{name}/{file}")
        if not (run / "metrics.json").is_file():
            print(name, "did not finish")
            continue
        tuned = json.loads((run / "metrics.json").read_text())["tuned"]
        v1, v2 = tuned["v1.1"]["f1"], tuned["v2.0"]
        print(f"{name}: v1.1 F1 {v1:.2f}; v2.0 threshold {v2['null_threshold']:.3f} first-half F1 "
              f"{v2['first_half']['f1']:.2f}; second half F1 {v2['second_half']['f1']:.2f} "
              f"NoAns {v2['second_half'].get('NoAns_f1', 0):.2f} HasAns {v2['second_half'].get('HasAns_f1', 0):.2f}")
        if v1 >= min_v1:
            candidates.append((v2["first_half"]["f1"], name))
if candidates:
    best = max(candidates)[1]
    for part in sorted((w / "runs" / best / "export").iterdir()):
        shutil.copy(part, out / part.name)
    (out / "chosen.txt").write_text(best + "\n")
    print("export of", best, "comes back")
else:
    print("no run keeps v1.1 F1 >=", min_v1, ": no weights come back")
PY
ls -la "$OUT"
