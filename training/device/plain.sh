#!/usr/bin/env bash
# Call 1 (carry .carry/train): stage base + SQuAD, featurize once, start the plain fine-tunes in the background.
set -euo pipefail
source training/device/common.sh
cp -r .carry/train/base .carry/train/squad "$W/"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, tokenizers, safetensors, numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'numpy', numpy.__version__)"
python3 - <<'PY'
import logging, time
from pathlib import Path
from realtime_qa.training.config import TrainConfig
from realtime_qa.training.data import cached_train_windows
logging.basicConfig(level=logging.INFO)
t = time.perf_counter()
config = TrainConfig.from_file(Path("training/configs/student_plain.json"))
windows, stats = cached_train_windows(Path("/root/qa/squad/train-v1.1.json.gz"), Path("/root/qa/base"), config.featurizer, Path("/root/qa/cache"))
print(f"featurized {stats} in {time.perf_counter() - t:.1f} s; mean window {windows.lengths.mean():.1f} tokens")
PY
for cfg in "$@"; do
  launch "$cfg" python3 -m realtime_qa.training.cli finetune --config "training/configs/$cfg.json" --squad-dir "$W/squad" \
    --base "$W/base" --cache-dir "$W/cache" --run-dir "$W/runs/$cfg"
done
sleep 45
status
