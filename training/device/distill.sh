#!/usr/bin/env bash
# Start distillation runs in the background against the teacher run already on the machine.
# Usage: distill.sh CONFIG...
set -euo pipefail
source training/device/common.sh
for cfg in "$@"; do
  launch "$cfg" python3 -m realtime_qa.training.cli distill --config "training/configs/$cfg.json" --squad-dir "$W/squad" \
    --base "$W/base" --cache-dir "$W/cache" --run-dir "$W/runs/$cfg" --teacher-run "$W/runs/teacher"
done
sleep 30
status
