#!/usr/bin/env bash
# Issue 12, goal 4: split-K Triton GEMMs (qacore/backends/torch_gemm.py) against the previous engine on the
# H200. GPU tests, then `qa-bench engine` with the previous engine (`fused`) as the baseline of every row and
# the `splitk` variants beside it (shipped model and BERT-large, batch 1/8/32, sequence 128/384), kernel
# profiles at 1x128, and SQuAD v1.1 dev F1 through the previous and the split-K paths. With SWEEP=1 (default)
# the GEMM tile/split sweep runs first and the splitk variants and the F1 use its winners; with SWEEP=0 they
# use the committed torch_gemm.TABLE. Run from the repository root with .carry/gpu carried
# (dev-v1.1.json.gz); everything lands in $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SQUAD=.carry/gpu/dev-v1.1.json.gz
TAG=${TAG:-splitk}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader; nproc
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } 2>&1 | tee $OUT/env_$TAG.txt
step() { echo "=== $* ($(date -u +%T))"; }
step tests
mkdir -p ../shared/data/squad && cp $SQUAD ../shared/data/squad/  # where the tests' fixtures look
timeout ${TESTS_S:-120} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_torch_gemm.py \
  tests/test_torch_layer_kernels.py 2>&1 | tail -8
SWEEP_ARGS=""
[ "${SWEEP:-1}" = 1 ] && SWEEP_ARGS="--gemm-sweep ${SWEEP_M:-128,384,1024}"
step engine
timeout ${ENGINE_S:-420} python3 -m realtime_qa.benchmarks.engine_bench --models shipped,bert-large \
  --batch-sizes ${BATCHES:-1,8,32} --seq-lengths 128,384 --variants fused,splitk,fused_spans,splitk_spans \
  --profile-shapes 1x128 --min-time ${MIN_TIME:-0.2} $SWEEP_ARGS --out $OUT/engine_h200_$TAG.json 2>&1 \
  | grep -v " INFO " | tee $OUT/engine_$TAG.log | tail -70
step f1
TABLE_ARGS=""
[ "${SWEEP:-1}" = 1 ] && TABLE_ARGS="--gemm-table $OUT/engine_h200_$TAG.json"
timeout ${F1_S:-120} python3 -m realtime_qa.benchmarks.device.squad_f1 --squad $SQUAD --paths 0,1,4,5 $TABLE_ARGS \
  --out $OUT/squad_f1_$TAG.json 2>&1 | grep -v "INFO\|Warning" | tail -12
step done
