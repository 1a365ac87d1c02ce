#!/usr/bin/env bash
# Wait (at most MAX_WAIT seconds) until RUN has its export, then copy its model parts, metrics and log to $OUT.
# Usage: collect.sh MAX_WAIT RUN [RUN...]   (the first RUN's model comes back; the others' metrics and logs only)
set -uo pipefail
source training/device/common.sh
max_wait=$1; shift
deadline=$((SECONDS + max_wait))
for run in "$@"; do
  while [ ! -f "$W/runs/$run/export/export.json" ] && [ $SECONDS -lt $deadline ]; do sleep 10; done
done
status
first=1
for run in "$@"; do
  d="$W/runs/$run"
  if [ $first = 1 ] && [ -f "$d/export/export.json" ]; then
    mkdir -p "$OUT/$run"; cp "$d"/export/* "$OUT/$run/"
  fi
  [ -f "$d/metrics.json" ] && cp "$d/metrics.json" "$OUT/$run.metrics.json"
  [ -f "$d/train_log.jsonl" ] && cp "$d/train_log.jsonl" "$OUT/$run.train_log.jsonl"
  first=0
done
ls -laR "$OUT"
