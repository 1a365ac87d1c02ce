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
