#!/usr/bin/env bash
# Profile of the service on the H200 (issue 12: "profile first"), one device call:
#   1. call_budget: every host step of one question, the GPU replay, spin vs blocking-sync waits, thread hand-offs;
#   2. qa-serve at concurrency 1 (passage ids, batcher off) under py-spy (native frames where the machine allows)
#      and with every garbage collection timed (gc_trace), client too;
#   3. qa-serve --workers 8 at concurrency 256: py-spy of one worker, GPU utilization (nvidia-smi dmon), load average.
# Run from the repository root with .carry/gpu carried (whl/ as in serve_h200.sh plus py-spy; dev-v1.1.json.gz).
# Results in $OUT/profile.tgz.
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .carry/gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
[ -d realtime_qa/qa/v1 ] || python3 scripts/gen_protos.py || exit 1  # carried from the dev machine when grpcio-tools is not
R=/tmp/prof; mkdir -p $R
SQUAD=$PWD/.carry/gpu/dev-v1.1.json.gz
PIDS=()
trap 'kill ${PIDS[@]} 2>/dev/null; tar czf $OUT/profile.tgz -C $R .' EXIT
step() { echo "=== $* ($(date -u +%T))"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; uname -r; lscpu | grep -i "model name"
  python3 -c "import sys, torch, grpc; print(sys.version.split()[0], torch.__version__, grpc.__version__)"; } | tee $R/env.txt
step build engine
python3 -m realtime_qa.builder.cli -m models/minilm-l6-squad -o /tmp/eng-torch --backend torch --fp16 -b 1 -b 8 -b 32 \
  -s 128 -s 384 --force 2>&1 | tail -1

step call budget
timeout 180 python3 -m realtime_qa.benchmarks.device.call_budget --engine /tmp/eng-torch --squad $SQUAD \
  --out $R/call_budget.json 2>&1 | tee $R/call_budget.md

wait_serving() {  # log file, count
  for _ in $(seq 240); do
    [ "$(grep -c '\] serving ' $1)" -ge "$2" ] && return 0; sleep 0.5
  done; echo "server did not start"; tail -15 $1; return 1
}
step concurrency 1 under py-spy
python3 -m realtime_qa.benchmarks.device.gc_trace --out $R/gc_server_c1.json -- -m realtime_qa.services.cli \
  --engine /tmp/eng-torch --port 50071 --max-batch-size 1 2> $R/server_c1.log & PIDS+=($!)
wait_serving $R/server_c1.log 1 && {
  SP=${PIDS[-1]}
  (sleep 4; py-spy record --native -p $SP -d 10 -r 1000 --nonblocking --format raw -o $R/pyspy_c1_native.txt \
     > $R/pyspy_c1_native.log 2>&1 || py-spy record -p $SP -d 10 -r 1000 --nonblocking --format raw \
     -o $R/pyspy_c1.txt > $R/pyspy_c1.log 2>&1) & SPY=$!
  timeout 60 python3 -m realtime_qa.benchmarks.device.gc_trace --out $R/gc_client_c1.json -- \
    -m realtime_qa.benchmarks.cli serve --target 127.0.0.1:50071 --squad $SQUAD --concurrency 1 --passages ids \
    --duration-s 16 --warmup-s 1 --no-cpu-steps --json-out $R/c1.json 2>&1 | grep -E "^\||rror"
  wait $SPY
  kill -TERM $SP; wait $SP
}
cat $R/gc_server_c1.json $R/gc_client_c1.json 2>/dev/null; tail -2 $R/pyspy_c1*.log

step concurrency 256, --workers 8, under py-spy
python3 -m realtime_qa.services.cli --engine /tmp/eng-torch --port 50072 --max-batch-size 32 --workers 8 \
  2> $R/server_w8.log & PIDS+=($!)
wait_serving $R/server_w8.log 8 && {
  W=$(pgrep -f "realtime_qa.services.cli" | grep -v "^${PIDS[-1]}$" | tail -1)
  (sleep 4; py-spy record -p $W -d 6 -r 500 --nonblocking --format raw -o $R/pyspy_w8.txt > $R/pyspy_w8.log 2>&1) & SPY=$!
  (sleep 3; nvidia-smi dmon -s u -c 8 > $R/dmon_w8.txt 2>&1; uptime >> $R/dmon_w8.txt) & DMON=$!
  timeout 90 python3 -m realtime_qa.benchmarks.device.serve_load --target 127.0.0.1:50072 --squad $SQUAD \
    --concurrency 256 --processes 8 --channels 1 --duration-s 8 --warmup-s 2 --label "w8" --out $R/c256_w8.json 2>&1 | tail -2
  wait $SPY $DMON; cat $R/dmon_w8.txt
}
