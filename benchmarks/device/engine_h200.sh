#!/usr/bin/env bash
# GPU helper's development call on the H200 (issue 12, goal 4 + device span search): GPU tests, the engine
# benchmark with its baselines (shipped model, BERT-large), a tile sweep, kernel profiles, end-to-end rows,
# and SQuAD v1.1 dev F1 through every engine path. Run from the repository root on the GPU machine with
# .carry/gpu carried (dev-v1.1.json.gz); everything lands in $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SQUAD=../shared/data/squad/dev-v1.1.json.gz
mkdir -p ../shared/data/squad && cp .carry/gpu/dev-v1.1.json.gz ../shared/data/squad/
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader; nproc
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } 2>&1 | tee $OUT/env.txt
step() { echo "=== $* ($(date -u +%T))"; }
step tests
timeout ${TESTS_S:-150} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_torch_layer_kernels.py \
  tests/test_torch_engine.py -k "not squad_f1" 2>&1 | tail -25 | tee $OUT/tests.txt
step engine shipped
timeout ${SHIPPED_S:-200} python3 -m realtime_qa.benchmarks.engine_bench --models shipped --batch-sizes 1,8,32,128 \
  --seq-lengths 128,384 --variants hf_eager,torch_graphs,fused,layer,layer_spans --profile-shapes 1x128 \
  --block-sweep 1x128 --e2e-squad $SQUAD --e2e-questions 300 --min-time 0.2 \
  --out $OUT/engine_h200_shipped.json 2>&1 | grep -v " INFO " | tail -60
step engine bert-large
timeout ${LARGE_S:-120} python3 -m realtime_qa.benchmarks.engine_bench --models bert-large --batch-sizes 1,32 \
  --seq-lengths 128,384 --variants hf_eager,fused,layer,layer_spans --min-time 0.2 \
  --out $OUT/engine_h200_large.json 2>&1 | grep -v " INFO " | tail -30
step f1
timeout ${F1_S:-150} python3 -m realtime_qa.benchmarks.device.squad_f1 --squad $SQUAD --out $OUT/engine_h200_squad_f1.json \
  ${F1_ARGS:-} 2>&1 | grep -v "INFO\|Warning" | tail -12
step done
