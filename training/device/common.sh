# Shared settings of the device-machine scripts (sourced). Everything persistent lives under $W, outside the
# repository copy, and survives between calls while the machine stays warm.
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
W=/root/qa
mkdir -p "$W/logs" "$W/runs" "$W/cache" "$W/teacher"
status() {  # one line per run: last log line
  for f in "$W"/logs/*.log; do
    if [ -f "$f" ]; then echo "$(basename "$f"): $(tail -n 1 "$f" | cut -c1-220)"; fi
  done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
}
launch() {  # launch NAME CMD...: run in its own session so it outlives the call
  local name=$1; shift
  setsid nohup "$@" > "$W/logs/$name.log" 2>&1 < /dev/null &
  echo "launched $name (pid $!)"
}
chain_call() {  # chain_call MAX_SECONDS SCRIPT ARGS...: start `SCRIPT --chain ARGS` once, in its own session (it
  # outlives the call), and wait at most MAX_SECONDS for it to touch $W/chain.done; fails while it has not, so that the
  # same command in the next call (machine still warm) starts nothing again, waits and then collects.
  local max_seconds=$1 script=$2; shift 2
  local deadline=$((SECONDS + max_seconds))
  if [ ! -e "$W/chain.started" ]; then
    touch "$W/chain.started"
    setsid nohup bash "$script" --chain "$@" > "$W/logs/chain.txt" 2>&1 < /dev/null &
  fi
  while [ ! -e "$W/chain.done" ] && [ $SECONDS -lt $deadline ]; do sleep 5; done
  cat "$W/logs/chain.txt"
  status
  if [ ! -e "$W/chain.done" ]; then echo "chain not finished after ${max_seconds}s: call again with the same command"; return 1; fi
}
