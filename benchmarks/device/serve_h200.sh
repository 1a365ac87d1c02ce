#!/usr/bin/env bash
# The service on the H200 (issue 12, goals 1 and 2), one device call, today's code against the previous commit's
# in the same run:
#   base   the previous commit's services and qacore (BASE_DIR: a copy of that commit's code, models linked)
#   new    this working tree
# 1. concurrency 1 (one qa-bench process, unary Answer, passage inline and by passage_id) against one qa-serve
#    process each: default flags (batcher on), and --max-batch-size 1 (batcher off, as the earlier files ran);
#    the bare grpc.aio echo floor measured by the first of them;
# 2. concurrency 256 from 8 client processes: base --workers 8; new --workers 8; new --workers N --engine-process
#    for N in 4 8 12 (one engine process holds the GPU; the workers send it their batches).
# C1_VARIANTS / C256_VARIANTS (space-separated name:TREE:flags and name:TREE:workers:flags[:API[:PICK]], TREE BASE,
# NEW or the name of an exported variable that holds another code tree (e.g. NOEAGER=/tmp/noeager), '+' for a space
# inside the flags, API unary (default) or stream, PICK serve_load's --pick (default round-robin);
# C1_VARIANTS=none skips concurrency 1), C1_APIS (default unary: the APIs every concurrency-1 point runs, e.g.
# unary,stream), ECHO_LOOPS (the echo floor's server loops, default asyncio), CLIENT_LOOP (the load generators'
# event loop, default asyncio as in the first runs; auto = uvloop) and CHANNELS (gRPC connections per load process;
# 1 in the first run) change the points. STEP_TRACE (default 0) rounds of the step trace, base then new, run first.
# Each concurrency-256 point also samples the CPU use of every process for 3 s (cpu_<name>.txt) and keeps the
# server's merged /metrics after the load (metrics_<name>.txt).
# Run from the repository root with .carry/gpu carried (whl/: grpcio 1.85.3, grpcio-health-checking and -reflection
# 1.85.1, protobuf 7.36.2, prometheus-client 0.26.0, aiostream 0.8.1 for Python 3.12; dev-v1.1.json.gz), the
# generated realtime_qa/{qa,asr,assistant,response} packages and BASE_DIR (default .carry/base). Results in
# $OUT/results.tgz.
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .carry/gpu/whl/*.whl || exit 1
export PATH=/tmp/site/bin:$PATH
NEW=$PWD BASE=$PWD/${BASE_DIR:-.carry/base}
[ -e $BASE/models ] || ln -s $NEW/models $BASE/models  # the base copy holds code only
[ -d realtime_qa/qa/v1 ] || python3 scripts/gen_protos.py || exit 1  # carried when grpcio-tools is not
R=/tmp/res; mkdir -p $R
SQUAD=$PWD/.carry/gpu/dev-v1.1.json.gz
PIDS=()
trap 'kill ${PIDS[@]} 2>/dev/null; tar czf $OUT/results.tgz -C $R .' EXIT
step() { echo "=== $* ($(date -u +%T))"; }
# Which checkout's realtime_qa the next commands import (python -m puts the working directory first on the path).
code() { export PYTHONPATH=/tmp/site:$1; TREE=$1; }
code $NEW
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; uname -r
  python3 -c "import sys, torch, grpc, google.protobuf as p; print(sys.version.split()[0], torch.__version__,
grpc.__version__, p.__version__)"; (cd $BASE && cat COMMIT); git log -1 --format=%h 2>/dev/null; } | tee $R/env.txt
step build engine
python3 -m realtime_qa.builder.cli -m models/minilm-l6-squad -o /tmp/eng-torch --backend torch --fp16 -b 1 -b 8 -b 32 \
  -s 128 -s 384 --force 2>&1 | tail -1
# EXTRA_ENGINES="name:builder+flags ...": more engines of the shipped model, /tmp/eng-<name>, which a variant serves
# with --engine+/tmp/eng-<name> in its flags (e.g. b128:--fp16+-b+1+-b+8+-b+32+-b+128+-s+128+-s+384).
for extra in ${EXTRA_ENGINES:-}; do
  IFS=: read -r name build <<< "$extra"; step "build engine $name"
  # shellcheck disable=SC2086
  python3 -m realtime_qa.builder.cli -m models/minilm-l6-squad -o /tmp/eng-$name --backend torch ${build//+/ } --force \
    2>&1 | tail -1
done

start_server() {  # name, processes that must report serving, qa-serve flags...
  local name=$1 want=$2 engine=(--engine /tmp/eng-torch); shift 2
  [[ " $* " == *" --engine "* ]] && engine=()  # the variant names its own engine
  (cd $TREE && exec python3 -m realtime_qa.services.cli "${engine[@]}" "$@") 2> $R/server_$name.log &
  PIDS+=($!)
  for _ in $(seq 360); do
    [ "$(grep -c '\] serving ' $R/server_$name.log)" -ge "$want" ] && return 0
    kill -0 ${PIDS[-1]} 2>/dev/null || break; sleep 0.5
  done
  echo "server $name did not start"; tail -15 $R/server_$name.log; return 1
}
stop_server() { kill ${PIDS[-1]} 2>/dev/null; wait ${PIDS[-1]} 2>/dev/null; }

port=50060
# STEP_TRACE=N: before the rest, N rounds of benchmarks/device/step_trace.py, base then new (one question's steps).
for round in $(seq ${STEP_TRACE:-0}); do
  for tree in BASE NEW; do
    step "step trace $tree $round"; code ${!tree}; port=$((port + 1))
    (cd $TREE && timeout 240 python3 -m realtime_qa.benchmarks.device.step_trace --engine /tmp/eng-torch --squad $SQUAD \
      --questions 2000 --port $port --out $R/trace_${tree,,}_$round.json) 2>&1 | grep -iE "total" | tail -2
  done
done
[ "${C1_VARIANTS:-}" != none ] && {
step concurrency 1
for variant in ${C1_VARIANTS:-base:BASE: new:NEW: base_b1:BASE:--max-batch-size+1 new_b1:NEW:--max-batch-size+1}; do
  IFS=: read -r name tree flags <<< "$variant"; port=$((port + 1)); flags=${flags//+/ }; tree=${!tree}
  code $tree
  # shellcheck disable=SC2086 # flags is a list of words
  if start_server "c1_$name" 1 --port $port $flags; then
    code $NEW; echo_floor=""; [ $name = base ] && echo_floor=--echo-floor  # the floor once, in the same run
    timeout 200 python3 -m realtime_qa.benchmarks.cli serve --target 127.0.0.1:$port --squad $SQUAD --concurrency 1 \
      --passages inline,ids --api ${C1_APIS:-unary} --client-event-loop ${CLIENT_LOOP:-asyncio} --duration-s 8 \
      --warmup-s 1 --no-cpu-steps $echo_floor --echo-event-loops ${ECHO_LOOPS:-asyncio} --json-out $R/c1_$name.json \
      2>&1 | grep -E "^\| (external|grpc)|rror" | sed "s/^| external/| $name/"
  fi
  stop_server
done
}

step concurrency 256
for variant in ${C256_VARIANTS:-base_w8:BASE:8:--workers+8 new_w8:NEW:8:--workers+8 \
    new_w4_ep:NEW:4:--workers+4+--engine-process new_w8_ep:NEW:8:--workers+8+--engine-process \
    new_w12_ep:NEW:12:--workers+12+--engine-process}; do
  IFS=: read -r name tree workers flags api pick <<< "$variant"; port=$((port + 1)); began=$(date +%s)
  flags=${flags//+/ }; tree=${!tree}
  code $tree
  # shellcheck disable=SC2086
  if start_server "$name" $workers --port $port --max-batch-size 32 --metrics-port $((port + 1000)) $flags; then
    echo "$name: serving after $(( $(date +%s) - began )) s"
    code $NEW
    (sleep 4; nvidia-smi dmon -s u -c 4 > $R/dmon_$name.txt 2>&1) & DMON=$!
    (sleep 4; python3 -m realtime_qa.benchmarks.device.cpu_by_process --seconds 3 > $R/cpu_$name.txt 2>&1) & CPU=$!
    timeout 120 python3 -m realtime_qa.benchmarks.device.serve_load --target 127.0.0.1:$port --squad $SQUAD \
      --concurrency 256 --processes 8 --channels ${CHANNELS:-1} --duration-s 6 --warmup-s 2 --label "$name" \
      --api ${api:-unary} --event-loop ${CLIENT_LOOP:-asyncio} --pick ${pick:-round-robin} --out "$R/c256_$name.json" \
      2>&1 | tail -1
    python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$((port + 1000))/metrics').read().decode())" \
      > $R/metrics_$name.txt 2>&1
    wait $DMON $CPU; awk '$1 == 0 {s += $2; n++} END {if (n) printf "GPU SM busy %.0f %% (mean of %d samples)\n", s/n, n}' \
      $R/dmon_$name.txt | tee -a $R/dmon_$name.txt
    uptime
  fi
  stop_server
done
step done
