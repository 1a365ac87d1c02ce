#!/usr/bin/env bash
# Background chain: fine-tune the teacher (saving its logits), then the distillation runs side by side.
# Usage: teacher_chain.sh DISTILL_CONFIG...
set -uo pipefail
source training/device/common.sh
python3 -m realtime_qa.training.cli teacher --config training/configs/teacher_mpnet.json --squad-dir "$W/squad" --base "$W/base" \
  --cache-dir "$W/cache" --run-dir "$W/runs/teacher" --pieces "$W"/teacher/p* || exit 1
for cfg in "$@"; do
  python3 -m realtime_qa.training.cli distill --config "training/configs/$cfg.json" --squad-dir "$W/squad" --base "$W/base" \
    --cache-dir "$W/cache" --run-dir "$W/runs/$cfg" --teacher-run "$W/runs/teacher" > "$W/logs/$cfg.log" 2>&1 &
done
wait
