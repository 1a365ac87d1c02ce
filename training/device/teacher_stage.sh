#!/usr/bin/env bash
# Call 1 of 2 of the teacher-distillation experiment (teacher_negatives.sh is call 2, made while the machine is still
# warm): the start model does not fit in one call beside the working tree and the data, so this call only leaves the
# first part of its delta (carry .carry/start_delta = start_delta.part1, `training.weight_delta` against the
# shipped model) under $W/stage, where call 2 finds it. Usage: teacher_stage.sh
set -euo pipefail
source training/device/common.sh
mkdir -p "$W/stage"
cp .carry/start_delta/start_delta.part1 "$W/stage/"
sha256sum "$W/stage/start_delta.part1"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.is_available())"
