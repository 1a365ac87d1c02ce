#!/usr/bin/env bash
# The service on the H200 (issue 12, goals 1 and 2), one device call: the shipped model as the torch CUDA-graph
# engine (fp16), then qa-serve with
#   baseline      today's configuration before the device span search was wired in: --no-span-search, asyncio
#   spans         the device span search (the qa-eval / qa-assistant path), asyncio (the default)
#   spans+uvloop  the same on uvloop (--event-loop uvloop)
# at concurrency 1 (batcher off, passage inline and by passage_id, one qa-bench process), after the bare grpc.aio
# echo floor under both loops; then at concurrency 256 from 8 client processes against `--workers 8`, the same three.
# Run from the repository root with .carry/gpu carried (whl/: grpcio 1.85.3, grpcio-health-checking, -reflection and
# -tools 1.85.1, protobuf 7.36.2, uvloop 0.23.0, prometheus-client 0.26.0, aiostream 0.8.1, redis 8.1.0 for Python
# 3.12, the versions installed on the development machine; dev-v1.1.json.gz). Results in
# $OUT/results.tgz (and the console log in $OUT/log.txt when the caller tees it there).
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .carry/gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
python3 scripts/gen_protos.py || exit 1  # realtime_qa.qa.v1 etc. from proto/ (grpcio-tools is one of the wheels)
R=/tmp/res; mkdir -p $R
SQUAD=$PWD/.carry/gpu/dev-v1.1.json.gz
PIDS=()
trap 'kill ${PIDS[@]} 2>/dev/null; tar czf $OUT/results.tgz -C $R .' EXIT
step() { echo "=== $* ($(date -u +%T))"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; uname -r
  python3 -c "import sys, torch, grpc, google.protobuf as p, uvloop; print(sys.version.split()[0], torch.__version__,
grpc.__version__, p.__version__, uvloop.__version__)"; } | tee $R/env.txt
step build engine
python3 -m realtime_qa.builder.cli -m models/minilm-l6-squad -o /tmp/eng-torch --backend torch --fp16 -b 1 -b 8 -b 32 \
  -s 128 -s 384 --force 2>&1 | tail -1

step serve concurrency 1
timeout 240 python3 -m realtime_qa.benchmarks.cli serve --engine /tmp/eng-torch --squad $SQUAD --concurrency 1 \
  --passages inline,ids --max-batch-size 1 --duration-s 5 --warmup-s 1 --no-cpu-steps \
  --echo-floor --echo-event-loops asyncio,uvloop \
  --variant "baseline=--no-span-search" --variant "spans=" --variant "spans+uvloop=--event-loop uvloop" \
  --json-out $R/serve_h200_c1.json --markdown-out $R/serve_h200_c1.md 2>&1 | tee $R/serve_c1.log \
  | grep -E "^\||Error|error:|Traceback"

start_server() {  # name, processes that must report their model warm ("serving ..."), qa-serve flags...
  local name=$1 want=$2; shift 2
  python3 -m realtime_qa.services.cli --engine /tmp/eng-torch "$@" 2> $R/server_$name.log & PIDS+=($!)
  for _ in $(seq 240); do
    [ "$(grep -c '\] serving ' $R/server_$name.log)" -ge "$want" ] && return 0
    kill -0 ${PIDS[-1]} 2>/dev/null || break; sleep 0.5
  done
  echo "server $name did not start"; tail -15 $R/server_$name.log; return 1
}
step serve concurrency 256, --workers 8
port=50080
for variant in "baseline:--no-span-search" "spans:" "spans+uvloop:--event-loop uvloop"; do
  name=${variant%%:*}; flags=${variant#*:}; port=$((port + 1)); began=$(date +%s)
  # shellcheck disable=SC2086 # flags is a list of words
  if start_server "w8_$name" 8 --port $port --max-batch-size 32 --workers 8 $flags; then
    echo "$name: 8 workers serving after $(( $(date +%s) - began )) s"
    timeout 90 python3 -m realtime_qa.benchmarks.device.serve_load --target 127.0.0.1:$port --squad $SQUAD \
      --concurrency 256 --processes 8 --duration-s 5 --warmup-s 2 --label "$name --workers 8" \
      --out "$R/serve_h200_c256_w8_$name.json" 2>&1 | tail -2
  fi
  kill ${PIDS[-1]} 2>/dev/null; wait ${PIDS[-1]} 2>/dev/null
done
step done
