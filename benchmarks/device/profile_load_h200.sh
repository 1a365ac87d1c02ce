#!/usr/bin/env bash
# Where the cores go at concurrency 256 on the H200 host (issue 12, goal 2's profile), one device call: qa-serve
# --workers 8 without and with --engine-process under the 8-process load generator; during each point, CPU use by
# process and thread (cpu_by_process) and py-spy samples of one worker and of the engine process.
# Run from the repository root with .carry/gpu carried (whl/ as in serve_h200.sh plus py-spy; dev-v1.1.json.gz)
# and the generated realtime_qa/{qa,asr,assistant,response}. Results in $OUT/profile_load.tgz.
# VARIANTS ("name:workers:flags ...", '+' for a space in the flags; default the two points above), API (unary or
# stream), CHANNELS (connections per load process, default 1) and CLIENT_LOOP (asyncio or auto) change the points;
# WORKER=busiest samples the worker that used the most CPU in a first 2 s window instead of the last one started.
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .carry/gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
[ -d realtime_qa/qa/v1 ] || python3 scripts/gen_protos.py || exit 1
R=/tmp/profload; mkdir -p $R
SQUAD=$PWD/.carry/gpu/dev-v1.1.json.gz
PIDS=()
trap 'kill ${PIDS[@]} 2>/dev/null; tar czf $OUT/profile_load.tgz -C $R .' EXIT
python3 -m realtime_qa.builder.cli -m models/minilm-l6-squad -o /tmp/eng-torch --backend torch --fp16 -b 1 -b 8 -b 32 \
  -s 128 -s 384 --force 2>&1 | tail -1
port=50090
for variant in ${VARIANTS:-w8:8:--workers+8 w8_ep:8:--workers+8+--engine-process}; do
  IFS=: read -r name workers flags <<< "$variant"; port=$((port + 1)); flags=${flags//+/ }
  # shellcheck disable=SC2086
  python3 -m realtime_qa.services.cli --engine /tmp/eng-torch --port $port --max-batch-size 32 $flags \
    2> $R/server_$name.log & PIDS+=($!)
  for _ in $(seq 240); do [ "$(grep -c '\] serving ' $R/server_$name.log)" -ge $workers ] && break; sleep 0.5; done
  host=$(grep -o 'qa-serve-engine-0 (pid [0-9]*' $R/server_$name.log | grep -o '[0-9]*$')
  worker=$(pgrep -P ${PIDS[-1]} -f spawn_main | grep -vx "${host:-0}" | tail -1)
  timeout 90 python3 -m realtime_qa.benchmarks.device.serve_load --target 127.0.0.1:$port --squad $SQUAD \
    --concurrency 256 --processes 8 --channels ${CHANNELS:-1} --duration-s ${DURATION:-7} --warmup-s 2 --label "$name" \
    --api ${API:-unary} --event-loop ${CLIENT_LOOP:-asyncio} --out $R/c256_$name.json > $R/load_$name.txt 2>&1 & L=$!
  sleep 4
  [ "${WORKER:-last}" = busiest ] && worker=$(python3 -m realtime_qa.benchmarks.device.cpu_by_process --seconds 2 |
    awk -v h=${host:-0} '/spawn_main/ && $3 != h {print $3; exit}')
  echo "== $name: parent ${PIDS[-1]}, worker $worker sampled, engine process ${host:-none}"
  python3 -m realtime_qa.benchmarks.device.cpu_by_process --seconds 3 --threads > $R/cpu_$name.txt & A=$!
  py-spy record -p $worker -d 4 -r 500 --nonblocking --format raw -o $R/spy_worker_$name.txt \
    > $R/spy_worker_$name.log 2>&1 & B=$!
  C=$B; [ -n "$host" ] && { py-spy record -p $host -d 4 -r 500 --nonblocking --format raw \
     -o $R/spy_host_$name.txt > $R/spy_host_$name.log 2>&1 & C=$!; }
  wait $L; tail -1 $R/load_$name.txt
  wait $A $B $C; head -30 $R/cpu_$name.txt
  kill ${PIDS[-1]}; wait ${PIDS[-1]} 2>/dev/null
done
