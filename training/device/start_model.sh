# Sourced by the chains of teacher_negatives.sh and soup.sh (steps 1-2 of each): with $carry set to the call's
# carry folder (start_delta.part2, train-v1.1 / dev-v1.1 / dev-v2.0 .json.xz, negatives.content.sha256) and the
# first part of the delta under $W/stage (left by teacher_stage.sh), it
#  1. rebuilds the start model (the distilled student before any abstention tuning, sha256 688c3d63...) from the
#     shipped model + the delta (`training.weight_delta`, every file's sha256 checked) and sets $start to it; if
#     the first part is missing (a fresh machine), $start stays the shipped model and the runs say so
#     (start_model_sha256);
#  2. makes the hard negatives here ($W/negatives.jsonl.xz, `qa-train hard-negatives`, seed 42), checks their
#     content against the file the shipped run was trained on (sha256 of the decompressed JSONL), and featurizes
#     the v1.1 train windows once, so the runs do not all do it at the same time.
# It also defines run(), which the chains use for every `qa-train abstain`.
mkdir -p "$W/squad" "$W/stage"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__)"
timeout 60 python3 - "$carry" "$W/squad" <<'PY'
import gzip, lzma, sys
from pathlib import Path
carry, squad = Path(sys.argv[1]), Path(sys.argv[2])
for name in ("train-v1.1", "dev-v1.1", "dev-v2.0"):
    (squad / f"{name}.json.gz").write_bytes(gzip.compress(lzma.decompress((carry / f"{name}.json.xz").read_bytes()), 1))
PY
timeout 240 python3 -m realtime_qa.training.cli hard-negatives --squad-dir "$W/squad" --out "$W/negatives.jsonl.xz" \
  > "$W/logs/hard_negatives.log" 2>&1 &
negatives_pid=$!
start=models/minilm-l6-squad
if [ -f "$W/stage/start_delta.part1" ]; then
  cat "$W/stage/start_delta.part1" "$carry/start_delta.part2" > "$W/start_delta.tar.xz"
  if timeout 120 python3 -m realtime_qa.training.weight_delta apply models/minilm-l6-squad "$W/start_delta.tar.xz" \
    "$W/start_model" > /dev/null; then
    start="$W/start_model"
  fi
fi
python3 -c "import sys; from pathlib import Path; from realtime_qa.builder.checkpoint import checkpoint_sha256; \
print('start model', sys.argv[1], checkpoint_sha256(Path(sys.argv[1])))" "$start"
timeout 120 python3 - "$W" "$start" <<'PY'
import sys
from pathlib import Path
from realtime_qa.training.config import TrainConfig
from realtime_qa.training.data import cached_train_windows
w = Path(sys.argv[1])
print(cached_train_windows(w / "squad/train-v1.1.json.gz", Path(sys.argv[2]), TrainConfig("x").featurizer, w / "cache")[1])
PY
wait "$negatives_pid"; tail -n 1 "$W/logs/hard_negatives.log"
got=$(python3 -c "import hashlib, lzma, sys; print(hashlib.sha256(lzma.open(sys.argv[1]).read()).hexdigest())" \
  "$W/negatives.jsonl.xz")
if [ "$got" = "$(cat "$carry/negatives.content.sha256")" ]; then echo "negatives: the shipped run's ($got)"
else echo "negatives DIFFER from the shipped run's: $got"; fi

run() {  # run CONFIG SECONDS [ARGS...]: one `qa-train abstain`
  local cfg=$1 seconds=$2; shift 2
  timeout "$seconds" python3 -m realtime_qa.training.cli abstain --config "training/configs/$cfg.json" --base "$start" \
    --squad-dir "$W/squad" --cache-dir "$W/cache" --run-dir "$W/runs/$cfg" --negatives "$W/negatives.jsonl.xz" "$@" \
    > "$W/logs/$cfg.log" 2>&1
}
