#!/usr/bin/env bash
# Issue 12, goal 4: the Triton attention kernel and the QA head in the last LayerNorm kernel
# (torch_kernels.attention; TorchEngineConfig.attention_kernel) against the engines before it on the H200.
# Every `qa-bench engine` row holds the previous engines as baselines measured in the same process: `fused`
# (cuBLAS + SDPA) and `splitk` (split-K GEMMs + SDPA, the default before), with the `attention` variants beside
# them. Steps (each its own process, so no profiler or sweep runs before a timed row):
#   1. GPU tests of the fused paths;
#   2. shipped model, batch 1/8 x sequence 128/384, with and without the span search, then the attention
#      kernel's tile sweep at 1x128 and 1x384;
#   3. REPEATS more processes timing only shipped 1x128, splitk vs attention (the spread across fresh engines);
#      the last of them lists both variants' kernels afterwards;
#   4. BERT-large, batch 1/8 x 128/384, tile sweep and kernel profile at 1x128;
#   5. SQuAD v1.1 dev F1 through the split-K paths with and without the attention kernel.
# Run from the repository root with .carry/gpu carried (dev-v1.1.json.gz); everything lands in $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SQUAD=.carry/gpu/dev-v1.1.json.gz
TAG=${TAG:-attention}
REPEATS=${REPEATS:-3}
LOG=$OUT/engine_$TAG.log
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader; nproc
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } 2>&1 | tee $OUT/env_$TAG.txt
step() { echo "=== $* ($(date -u +%T))" | tee -a $LOG; }
bench() {  # bench SECONDS ARGS...: qa-bench engine under a time limit; the full output goes to the log
  local limit=$1; shift
  timeout $limit python3 -m realtime_qa.benchmarks.engine_bench --min-time ${MIN_TIME:-0.5} "$@" 2>&1 \
    | grep -v " INFO " | tee -a $LOG | grep -v "^ \|^---\|^Self\|^kernels of\|^$"; }
step tests
mkdir -p ../shared/data/squad && cp $SQUAD ../shared/data/squad/  # where the tests' fixtures look
timeout ${TESTS_S:-120} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_torch_gemm.py \
  tests/test_torch_layer_kernels.py 2>&1 | tail -3
step shipped
bench 200 --models shipped --batch-sizes 1,8 --seq-lengths 128,384 \
  --variants fused,splitk,attention,splitk_spans,attention_spans --attention-sweep 1x128,1x384 \
  --out $OUT/engine_h200_${TAG}_shipped.json
mkdir -p /tmp/repeats
for run in $(seq 1 $REPEATS); do
  step "repeat $run"
  PROFILE_ARGS=""
  [ $run = $REPEATS ] && PROFILE_ARGS="--profile-shapes 1x128"
  bench 60 --models shipped --batch-sizes 1 --seq-lengths 128 --variants splitk,attention $PROFILE_ARGS \
    --out /tmp/repeats/$run.json
done
python3 -c "import json, sys; json.dump([json.load(open(p)) for p in sys.argv[1:]], open('$OUT/engine_h200_${TAG}_repeats.json', 'w'), indent=1)" /tmp/repeats/*.json
step bert-large
bench 200 --models bert-large --batch-sizes 1,8 --seq-lengths 128,384 --variants fused,splitk,attention \
  --attention-sweep 1x128 --profile-shapes 1x128 --out $OUT/engine_h200_${TAG}_large.json
step f1
timeout ${F1_S:-100} python3 -m realtime_qa.benchmarks.device.squad_f1 --squad $SQUAD --paths 4,5,6,7 \
  --out $OUT/squad_f1_$TAG.json 2>&1 | grep -v "INFO\|Warning" | tail -12
step done
