#!/usr/bin/env bash
# Model soups of the abstention runs (issue 11), after teacher_stage.sh left the first part of the start model's
# delta under $W/stage while the machine stayed warm. Carry .carry/teacher_negatives: start_delta.part2,
# train-v1.1 / dev-v1.1 / dev-v2.0 .json.xz and negatives.content.sha256 (as for teacher_negatives.sh).
# The work (steps 1-4) runs as one chain in its own session, so it outlives a call: this call waits for it at most
# MAX_SECONDS, then collects (step 5) if it is done; otherwise the same command in the next call, while the machine
# is still warm, starts nothing again, waits and collects.
#
#  1-2. Rebuild the start model and make the hard negatives (training/device/start_model.sh).
#  3. RUNs side by side, each `qa-train abstain` from the start model (the ingredients).
#  4. SOUPs, side by side: `qa-train soup` of the runs each names (NAME=RUN+RUN+...), the mean of their
#     weights, scored like a run.
#  5. Selection, fixed before any result came back: among every run and soup with SQuAD v1.1 dev F1 >= MIN_V1_F1,
#     the best first-half v2.0 F1; its float16 export comes back only if that F1 beats BEAT (the shipped
#     abstain_all_sd's first-half F1, 66.78091147752966). The held-out second half plays no part in the choice.
# Under $OUT: what `training.collect` writes (results.tar.gz, summary.txt, for a winner chosen.txt + its export).
# Usage: soup.sh MAX_SECONDS MIN_V1_F1 BEAT RUN... -- SOUP=RUN+RUN...
set -uo pipefail
source training/device/common.sh
if [ "${1:-}" = "--chain" ]; then  # ---- steps 1-4, in their own session ----
  shift
  carry=.carry/teacher_negatives
  source training/device/start_model.sh
  runs=(); soups=()
  for arg in "$@"; do
    if [ "$arg" = "--" ]; then continue; elif [[ $arg == *=* ]]; then soups+=("$arg"); else runs+=("$arg"); fi
  done
  echo "runs ${runs[*]} start at ${SECONDS}s"
  for cfg in "${runs[@]}"; do run "$cfg" 900 & done
  wait
  echo "runs done at ${SECONDS}s"
  for soup in "${soups[@]}"; do
    name=${soup%%=*}; IFS=+ read -r -a parts <<< "${soup#*=}"
    dirs=(); for part in "${parts[@]}"; do dirs+=("$W/runs/$part"); done
    timeout 300 python3 -m realtime_qa.training.cli soup --name "$name" --runs "${dirs[@]}" --base "$start" \
      --squad-dir "$W/squad" --run-dir "$W/runs/$name" > "$W/logs/$name.log" 2>&1 &
  done
  wait
  echo "soups done at ${SECONDS}s"
  touch "$W/chain.done"
  exit 0
fi  # ---- what each call does: ----
max_seconds=$1; min_v1=$2; beat=$3; shift 3
chain_call "$max_seconds" training/device/soup.sh "$@" || exit 0
names=(); for arg in "$@"; do [ "$arg" = "--" ] || names+=("${arg%%=*}"); done
timeout 60 python3 -m realtime_qa.training.collect "$OUT" "$W" "$min_v1" "$beat" --runs "${names[@]}" \
  --candidates "${names[@]}"
ls -la "$OUT"
