#!/usr/bin/env bash
# One call (carry .carry/abstain = train-v1.1, dev-v1.1, dev-v2.0 .json.gz and negatives.jsonl.xz of
# `qa-train hard-negatives`): tune the shipped model under each CONFIG side by side on the one GPU (the first run
# also scores the shipped model), then put results.tar.gz (every run's metrics.json, train_log.jsonl, console log
# and per-question v2.0 scores) and summary.txt under $OUT, plus the float16 export of the run with the best
# first-half v2.0 F1 among those that keep SQuAD v1.1 dev F1 >= MIN_V1_F1 (`training.collect`; none comes back
# when no run does).
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
# Every run is a candidate, and the best one comes back whatever the shipped model scores (BEAT -1: F1 >= 0).
python3 -m realtime_qa.training.collect "$OUT" "$W" "$min_v1" -1 --runs "$@" --candidates "$@"
ls -la "$OUT"
