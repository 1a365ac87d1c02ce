#!/usr/bin/env bash
# GPU helper's measurement call on the H200 (issue 12): engine rows with the device span search, BERT-large
# batch 1, SQuAD F1 of the span path, then the service: grpc.aio echo floor + qa-serve at concurrency 1 (inline
# passage and passage_id, batcher off), and at concurrency 256 from 8 client processes against qa-serve with the
# default settings (1 worker, the baseline) and with --workers 8; py-spy profile (non-blocking sampling) of the
# one-worker server under the concurrency-256 load, after the concurrency-1 latency rows (never during them).
# Run from the repository root with .carry/gpu carried (whl/ and dev-v1.1.json.gz); results in $OUT/results.tgz.
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .carry/gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
R=/tmp/res; mkdir -p $R ../shared/data/squad && cp .carry/gpu/dev-v1.1.json.gz ../shared/data/squad/
SQUAD=../shared/data/squad/dev-v1.1.json.gz
trap 'tar czf $OUT/results.tgz -C $R .; kill ${PIDS[@]} 2>/dev/null' EXIT
step() { echo "=== $* ($(date -u +%T))"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; uname -r
  python3 -c "import torch, grpc, google.protobuf as p; print(torch.__version__, grpc.__version__, p.__version__)"; } | tee $R/env.txt
python3 scripts/gen_protos.py || exit 1
python3 -m realtime_qa.builder.cli -m models/minilm-l6-squad -o /tmp/eng-torch --backend torch --fp16 -b 1 -b 8 -b 32 \
  -s 128 -s 384 --force 2>&1 | tail -1
step engine spans
timeout 80 python3 -m realtime_qa.benchmarks.engine_bench --models shipped --batch-sizes 1,8,32 --seq-lengths 128,384 \
  --variants fused,fused_spans,layer,layer_spans --min-time 0.2 --out $R/engine_h200_spans.json 2>&1 | grep -v " INFO "
step engine bert-large
timeout 60 python3 -m realtime_qa.benchmarks.engine_bench --models bert-large --batch-sizes 1 --seq-lengths 128 --variants fused \
  --min-time 0.3 --out $R/engine_h200_large.json 2>&1 | grep -v " INFO " | tail -4
step f1 fused+spans
timeout 45 python3 -m realtime_qa.benchmarks.device.squad_f1 --squad $SQUAD --out $R/engine_h200_squad_f1_spans.json --paths 1 \
  2>&1 | grep -v "INFO\|Warn" | tail -3
PIDS=()
start_server() {  # name, processes that must report their model warm ("serving ..."), qa-serve flags...
  local name=$1 want=$2; shift 2
  python3 -m realtime_qa.services.cli --engine /tmp/eng-torch "$@" 2> $R/server_$name.log & PIDS+=($!)
  for _ in $(seq 300); do
    [ "$(grep -c '\] serving ' $R/server_$name.log)" -ge "$want" ] && return 0
    kill -0 ${PIDS[-1]} 2>/dev/null || break; sleep 0.5
  done
  echo "server $name did not start"; tail -15 $R/server_$name.log; return 1
}
step serve concurrency 1
if start_server c1 1 --port 50061 --max-batch-size 1; then
  timeout 60 python3 -m realtime_qa.benchmarks.cli serve --target 127.0.0.1:50061 --echo-floor --concurrency 1 --duration-s 6 \
    --warmup-s 1 --json-out $R/serve_h200_c1_inline.json --markdown-out $R/serve_h200_c1_inline.md 2>&1 | grep "^|"
  timeout 40 python3 -m realtime_qa.benchmarks.cli serve --target 127.0.0.1:50061 --passage-ids --concurrency 1 --duration-s 6 \
    --warmup-s 1 --json-out $R/serve_h200_c1_pid.json --markdown-out $R/serve_h200_c1_pid.md 2>&1 | grep "^|"
  kill ${PIDS[-1]}; wait ${PIDS[-1]} 2>/dev/null
fi
step serve concurrency 256
for workers in 1 8; do
  if start_server w$workers $workers --port $((50070 + workers)) --max-batch-size 32 --workers $workers; then
    [ $workers = 1 ] && (sleep 4; timeout 20 py-spy record --nonblocking -p ${PIDS[-1]} -d 3 -r 200 -f raw \
      -o $R/pyspy_c256_w1.txt >/dev/null 2>&1) &
    timeout 60 python3 -m realtime_qa.benchmarks.device.serve_load --target 127.0.0.1:$((50070 + workers)) --squad $SQUAD \
      --concurrency 256 --processes 8 --duration-s 5 --warmup-s 2 --label "workers=$workers" \
      --out $R/serve_h200_c256_w$workers.json 2>&1 | tail -2
    kill ${PIDS[-1]}; wait ${PIDS[-1]} 2>/dev/null
  fi
done
step done
