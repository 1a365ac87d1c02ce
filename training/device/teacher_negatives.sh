#!/usr/bin/env bash
# Teacher-student distillation of the null logit (issue 11), after teacher_stage.sh left the first part of the start
# model's delta under $W/stage while the machine stayed warm. Carry .carry/teacher_negatives: start_delta.part2,
# train-v1.1 / dev-v1.1 / dev-v2.0 .json.xz and negatives.content.sha256.
# The work (steps 1-4) runs as one chain in its own session, so it outlives a call: this call waits for it at most
# MAX_SECONDS, then collects (step 5) if it is done; otherwise the same command in the next call, while the machine
# is still warm, starts nothing again, waits and collects. Measured on an H200 (2026-12-02): setup 92 s, the teacher
# about 290 s (2 epochs at 25-40 steps/s), the three students side by side about 190 s.
#
#  1. Rebuild the start model (the distilled student before any abstention tuning, sha256 688c3d63...) from the
#     shipped model + the delta (`training.weight_delta`, every file's sha256 checked). If the first part is
#     missing (a fresh machine), the runs start from the shipped model instead and say so (start_model_sha256).
#  2. Make the hard negatives here (`qa-train hard-negatives`, seed 42) and check their content against the file
#     the shipped run was trained on (sha256 of the decompressed JSONL); featurize the v1.1 train windows once.
#  3. TEACHER: `qa-train abstain` with plain cross-entropy on v1.1 + all four negative kinds. Same size as the
#     student (born-again distillation): the MPNet teacher does not fit in a call.
#  4. STUDENTs side by side, each from the start model, distilled from the teacher's float16 export
#     (`--teacher-dir`): soft targets are the teacher's logits on the positive AND the negative windows.
#  5. Selection, fixed before any result came back: among the STUDENTS (the teacher is a training aid, never a
#     candidate) with SQuAD v1.1 dev F1 >= MIN_V1_F1, the best first-half v2.0 F1; its float16 export comes back
#     only if that F1 beats BEAT (the shipped abstain_all_sd's first-half F1, 66.78091147752966). The held-out
#     second half plays no part in the choice.
# Under $OUT: results.tar.gz (every run's metrics.json, train_log.jsonl, console log, per-question v2.0 scores),
# summary.txt, and for a winner chosen.txt + its export (model.tar.partNN, export.json).
# Usage: teacher_negatives.sh MAX_SECONDS MIN_V1_F1 BEAT TEACHER STUDENT...
set -uo pipefail
source training/device/common.sh
if [ "${1:-}" = "--chain" ]; then  # ---- steps 1-4, in their own session (not indented: heredocs) ----
shift; teacher=$1; shift
carry=.carry/teacher_negatives
source training/device/start_model.sh

echo "teacher $teacher starts at ${SECONDS}s"
run "$teacher" 900
echo "teacher done at ${SECONDS}s (rc $?)"; tail -n 2 "$W/logs/$teacher.log" | cut -c1-400
if [ -d "$W/runs/$teacher/model" ]; then
  for cfg in "$@"; do run "$cfg" 900 --teacher-dir "$W/runs/$teacher/model" & done
  wait
fi
echo "students done at ${SECONDS}s"
touch "$W/chain.done"
exit 0
fi  # ---- end of the chain; what each call does: ----
max_seconds=$1; min_v1=$2; beat=$3; teacher=$4; shift 4
chain_call "$max_seconds" training/device/teacher_negatives.sh "$teacher" "$@" || exit 0
timeout 60 python3 -m realtime_qa.training.collect "$OUT" "$W" "$min_v1" "$beat" --runs "$teacher" "$@" \
  --candidates "$@"  # the teacher is a training aid, never a candidate
ls -la "$OUT"
